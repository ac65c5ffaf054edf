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
    with pytest.raises(ValueError, match="needs local weights: pass --clip"):
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
    curve = iou_curve(state, {(0, n): truth[n] for n in truth})
    assert curve[0]["iou"]["img1"] == {"[v1]": 1.0, "[v2]": 1.0, "[v3]": 1.0}
