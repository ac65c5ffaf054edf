import numpy as np
import pytest
import torch
from PIL import Image

from em_core.metrics import clip_image_similarity, feature_cosine_similarity, iou_curve, lpips_diversity


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A small CLIPModel of the real class with random weights, saved the way users save theirs."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=100),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _imgs(seed, n=2):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_and_feature_similarity_with_local_weights(clip_dir):
    a, b = _imgs(0), _imgs(1)
    same = clip_image_similarity(a[:1], a[:1], clip_dir)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert clip_image_similarity(a, b, clip_dir) < same
    assert feature_cosine_similarity(a[:1], a[:1], clip_dir) == pytest.approx(1.0, abs=1e-5)


def test_clear_messages_without_weights():
    with pytest.raises(ValueError, match="needs local weights: pass clip_dir=FOLDER"):
        clip_image_similarity(_imgs(0), _imgs(1), None)
    with pytest.raises(ValueError, match="needs an LPIPS network"):
        lpips_diversity(_imgs(0))


def test_lpips_diversity_with_a_given_network():
    l1 = lambda x, y: (x - y).abs().mean()  # noqa: E731 - stands in for an LPIPS net
    assert lpips_diversity(_imgs(0, 3), l1) > lpips_diversity([_imgs(0)[0]] * 3, l1) == 0.0


def test_iou_curve_against_true_masks(bundle, scene_files):
    from em_core.config import LearnConfig
    from em_core.dataset import prepare_image
    from em_core.em_loop import learn, start_state

    img = [prepare_image(bundle, scene_files[0][0], "[v1] and [v2] on [v3]")]
    truth = scene_files[0][1]
    fixed = {(0, n): truth[n] for n in truth}
    state = learn(bundle, img, start_state(bundle, img, LearnConfig(steps=1, mask_timesteps=2), fixed_masks=fixed),
                  progress=False)
    # The state's masks are the truth (kept as given), so scoring them against the truth itself could
    # only give 1.0; scored against other masks, the IoU must come out as the overlap says.
    est = {n: state.mask_history[0]["masks"][0][k].numpy() > 0.5 for k, n in enumerate(state.images[0]["names"])}
    curve = iou_curve(state, {(0, "[v1]"): truth["[v2]"], (0, "[v2]"): truth["[v2]"],
                              (0, "[v3]"): truth["[v3]"] | truth["[v1]"]})
    assert [c["step"] for c in curve] == [e["step"] for e in state.mask_history]
    got = curve[0]["iou"]["img1"]
    assert got["[v1]"] == 0.0 and got["[v2]"] == 1.0  # disjoint objects; a mask against its own truth
    union = est["[v3]"] | est["[v1]"]  # nearest sampling keeps a union a union on the latent grid
    assert 0 < got["[v3]"] < 1 and got["[v3]"] == pytest.approx(est["[v3]"].sum() / union.sum())


def test_iou_curve_on_the_latent_grid_by_hand():
    """A 4x4 latent grid under 32x32 truth: nearest sampling reads pixels 0, 8, 16, 24 of each axis."""
    from types import SimpleNamespace

    est = torch.zeros(2, 4, 4)
    est[0, :2, :2] = 1  # [v1]: the top left 2x2 cells
    est[1, 3, :3] = 1  # [v2]: three cells of the bottom row
    state = SimpleNamespace(images=[{"names": ["[v1]", "[v2]"]}], mask_history=[{"step": 5, "masks": [est]}])
    top = np.zeros((32, 32), bool)
    top[:16] = True  # rows 0-1 of the grid: 8 cells, 4 of them [v1]'s
    bottom = np.zeros((32, 32), bool)
    bottom[24:] = True  # row 3: 4 cells, 3 of them [v2]'s
    curve = iou_curve(state, {(0, "[v1]"): top, (0, "[v2]"): bottom})
    assert curve == [{"step": 5, "iou": {"img1": {"[v1]": 0.5, "[v2]": 0.75}}}]
    with pytest.raises(KeyError, match=r"\[v3\] is not a concept of image 1"):
        iou_curve(state, {(0, "[v3]"): top})


def test_clip_preprocessing_is_clips_own_and_matches_the_old_resize_on_square_images():
    """transformers' CLIPImageProcessor (built in code, nothing downloaded) replaced a hand-made
    squash-resize with CLIP's statistics: the same pixels on square images; a non-square one is
    centre-cropped, as CLIP itself was trained."""
    import numpy as np
    from PIL import Image

    from em_core.metrics import _pixels, clip_processor

    rng = np.random.default_rng(0)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    square = [Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)) for s in (24, 64)]
    got = clip_processor(32)(images=square, return_tensors="pt").pixel_values
    assert torch.equal(got, _pixels(square, 32, mean, std))
    wide = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))
    assert tuple(clip_processor(32)(images=[wide], return_tensors="pt").pixel_values.shape) == (1, 3, 32, 32)


def _imagenet_squash(images, size, mean, std):
    """What the feature metric fed its backbone before transformers' processors: each image
    bicubic-resized to size x size, scaled to [0, 1], normalised."""
    x = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
                  for im in images])
    return torch.from_numpy((x - np.array(mean, np.float32)) / np.array(std, np.float32)).permute(0, 3, 1, 2)


def test_feature_preprocessing_without_a_config_is_an_imagenet_resize(tmp_path):
    """A backbone folder with no preprocessor_config.json: transformers' ViTImageProcessor built in
    code, the model's size, ImageNet's mean and std, the same pixels as the hand-made resize it
    replaced (square or not: squashed, not cropped)."""
    from em_core.metrics import feature_processor

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((24, 24), (40, 20))]
    got = feature_processor(tmp_path, 32)(images=images, return_tensors="pt").pixel_values
    assert tuple(got.shape) == (2, 3, 32, 32)
    want = _imagenet_squash(images, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_feature_preprocessing_is_the_backbones_own_where_its_folder_has_one(tmp_path, clip_dir):
    """A folder with the backbone's saved image processor (here DINOv2's kind: shorter side to 40,
    centre crop 32, its own statistics) is preprocessed by it, read from the folder only."""
    import shutil

    from transformers import BitImageProcessor

    from em_core.metrics import feature_processor

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    folder = tmp_path / "backbone"
    shutil.copytree(clip_dir, folder)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=list(mean),
                      image_std=list(std)).save_pretrained(folder)
    rng = np.random.default_rng(2)
    square = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    got = feature_processor(folder, 999)(images=[square], return_tensors="pt").pixel_values
    want = _imagenet_squash([square], 40, mean, std)[:, :, 4:36, 4:36]  # 40 x 40, centre 32 x 32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    a = _imgs(0)
    assert feature_cosine_similarity(a[:1], a[:1], folder) == pytest.approx(1.0, abs=1e-5)
    assert feature_cosine_similarity(a[:1], _imgs(1)[:1], folder) < 1.0 - 1e-4


def test_matched_scores_interchangeable_concepts_under_their_best_assignment():
    from em_core.metrics import matched

    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = ~a
    est = {"[v1]": b, "[v2]": a, "[v3]": a}  # v1 and v2 landed on each other's objects
    ref = {"[v1]": a, "[v2]": b, "[v3]": a}
    assert matched(est, ref, []) == {"[v1]": 0.0, "[v2]": 0.0, "[v3]": 1.0}  # identity: both wrong
    assert matched(est, ref, [["[v1]", "[v2]"]]) == {"[v1]": 1.0, "[v2]": 1.0, "[v3]": 1.0}
    # A group whose masks match no better swapped keeps the identity's scores.
    assert matched(ref, ref, [["[v1]", "[v2]"]]) == {"[v1]": 1.0, "[v2]": 1.0, "[v3]": 1.0}


def test_a_swapped_pair_is_read_back_against_the_objects_its_masks_ended_on():
    from types import SimpleNamespace

    import torch

    from em_core.metrics import best_matching, final_matching

    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = ~a
    ref = {"[v1]": a, "[v2]": b, "[v3]": a}
    swapped = {"[v1]": b, "[v2]": a, "[v3]": a}
    assert best_matching(swapped, ref, [["[v1]", "[v2]"]]) == {"[v1]": "[v2]", "[v2]": "[v1]", "[v3]": "[v3]"}
    assert best_matching(swapped, ref, []) == {"[v1]": "[v1]", "[v2]": "[v2]", "[v3]": "[v3]"}
    names = ["[v1]", "[v2]", "[v3]"]
    masks = lambda d: [torch.tensor(np.stack([d[n] for n in names]), dtype=torch.float32)]
    # The last entry decides: the first one had the pair the right way round.
    state = SimpleNamespace(images=[{"names": names}], mask_history=[{"step": 0, "masks": masks(ref)},
                                                                     {"step": 50, "masks": masks(swapped)}])
    truth = {(0, n): m for n, m in ref.items()}
    assert final_matching(state, truth, [["[v1]", "[v2]"]]) == {"[v1]": "[v2]", "[v2]": "[v1]", "[v3]": "[v3]"}
    assert final_matching(state, truth) == {n: n for n in names}


def test_interchangeable_groups_follow_the_init_words():
    from em_core.tiny_world.evaluate import interchangeable

    init = {"[v1]": "triangle", "[v2]": "triangle", "[v3]": "circle", "[v4]": "sand"}
    assert interchangeable(init, ["[v1]", "[v2]", "[v3]"], False) == [["[v1]", "[v2]"]]
    assert interchangeable(init, ["[v1]", "[v2]", "[v3]"], True) == [["[v1]", "[v2]", "[v3]"]]
    assert interchangeable({"[v1]": "circle", "[v2]": "square"}, ["[v1]", "[v2]"], False) == []
