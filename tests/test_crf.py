import numpy as np
import pytest
from PIL import Image

from conftest import real_scenes
from em_core.cli import main
from em_core.crf import PRESETS, CRFParams, crf_probabilities, refine_masks
from em_core.images import open_image, open_mask
from em_core.masks import iou
from em_core.metrics import attention_like

SCENES = real_scenes()


def test_defaults_are_cutlers_settings_and_deeplab_keeps_the_old_set():
    """facebookresearch/CutLER maskcut/crf.py: MAX_ITER 10, POS_XY_STD 3, POS_W 7, Bi_XY_STD 50,
    Bi_RGB_STD 5, Bi_W 10 (the paper, section 3, adopts them). The DeepLab-v2 set this engine used
    before, mislabelled as CutLER's, is the 'deeplab' preset. DenseCRF runs at the image's own size."""
    d = CRFParams()
    assert (d.iterations, d.gaussian_sxy, d.gaussian_weight, d.bilateral_sxy, d.bilateral_srgb,
            d.bilateral_weight) == (10, 3.0, 7.0, 50.0, 5.0, 10.0)
    assert d.max_side is None and d.unary_scale == 1.0 and d.preset_name() == "cutler"
    assert CRFParams.preset("cutler") == d
    old = CRFParams.preset("deeplab")
    assert (old.iterations, old.gaussian_sxy, old.gaussian_weight, old.bilateral_sxy, old.bilateral_srgb,
            old.bilateral_weight) == (10, 1.0, 3.0, 67.0, 3.0, 4.0)
    assert old.preset_name() == "deeplab" and CRFParams(gaussian_sxy=2.0).preset_name() is None
    assert CRFParams.preset("deeplab", max_side=256).max_side == 256
    assert set(PRESETS) == {"cutler", "deeplab"}
    with pytest.raises(ValueError, match="choose one of cutler, deeplab"):
        CRFParams.preset("voc")
    from em_core.config import LearnConfig

    assert LearnConfig().crf == d


def _coarse(mask, rng):
    return attention_like(mask, rng)


@pytest.mark.skipif(not SCENES, reason="../shared/data/scenes is not beside the checkout")
@pytest.mark.parametrize("max_side", [None, 256])
def test_crf_brings_coarse_masks_closer_to_human_masks_on_real_photos(max_side):
    """At the photos' own side (the default) and with a 256 px working side (scored at full size)."""
    rng = np.random.default_rng(0)
    before, after = [], []
    for scene in SCENES:
        img = np.asarray(open_image(scene / "img.jpg"))
        truth = [open_mask(p) for p in sorted(scene.glob("mask*.png"))]
        coarse = np.stack([_coarse(t, rng) for t in truth])
        refined = refine_masks(img, coarse, CRFParams(max_side=max_side))
        assert refined.shape == coarse.shape
        before += [iou(c, t) for c, t in zip(coarse, truth)]
        after += [iou(r, t) for r, t in zip(refined, truth)]
    gain = np.mean(after) - np.mean(before)
    # CutLER's settings, seed 0: +8.0 (own side) and +7.6 (256 px) IoU points (benchmarks/README.md).
    assert gain > 0.03, (np.mean(before), np.mean(after))
    assert np.mean(np.array(after) >= np.array(before)) >= 0.8


def test_crf_probabilities_and_labels():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255
    mask = np.zeros((1, 32, 32), bool)
    mask[0, 4:28, 14:30] = True  # spills two pixels over the edge
    q = crf_probabilities(img, mask)
    assert q.shape == (2, 32, 32) and np.allclose(q.sum(0), 1, atol=1e-4)
    refined = refine_masks(img, mask, CRFParams(iterations=10))
    assert refined[0, 10, 14] == 0 and refined[0, 10, 20] == 1  # snapped to the colour edge


def test_crf_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="masks: expected"):
        refine_masks(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="image: expected"):
        refine_masks(np.zeros((8, 8), np.uint8), np.zeros((1, 8, 8), bool))


def test_a_concept_the_crf_wipes_out_keeps_part_of_its_input_mask():
    img = np.full((16, 16, 3), 128, np.uint8)
    masks = np.zeros((2, 16, 16), bool)
    masks[0] = True
    masks[1, 6:9, 6:9] = True
    with pytest.warns(UserWarning, match="removed mask 1"):
        refined = refine_masks(img, masks)
    assert refined[1].any() and not (refined[1] & ~masks[1]).any()
    assert not (refined[0] & refined[1]).any()


@pytest.mark.skipif(not SCENES, reason="../shared/data/scenes is not beside the checkout")
def test_refine_masks_cli_writes_one_png_per_mask(tmp_path):
    scene = SCENES[0]
    rng = np.random.default_rng(1)
    paths = []
    for k, p in enumerate(sorted(scene.glob("mask*.png"))):
        coarse = _coarse(open_mask(p), rng)
        q = tmp_path / f"coarse{k}.png"
        Image.fromarray(coarse.astype(np.uint8) * 255).save(q)
        paths += ["--mask", str(q)]
    out = tmp_path / "out"
    assert main(["refine-masks", "--image", str(scene / "img.jpg"), *paths, "--out", str(out)]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == len(paths) // 2
    assert Image.open(written[0]).size == Image.open(scene / "img.jpg").size



@pytest.mark.skipif(not SCENES, reason="../shared/data/scenes is not beside the checkout")
def test_crf_still_helps_on_smaller_images():
    """CutLER's settings are in pixels, made for full-size photos; at 128 px they still improve the
    coarse masks, though less: +2.9 IoU points against +8.0 at 512 px (the 'deeplab' set: +9.0
    at 128 px), seed 0, benchmarks/README.md.

    (Scaling the spatial deviations with the image side was tried with the 'deeplab' set and
    measured worse: +4.9 IoU points at 128 px scaled against +9.0 unscaled.)
    """
    rng = np.random.default_rng(0)
    before, after = [], []
    for scene in SCENES:
        img = np.asarray(open_image(scene / "img.jpg").resize((128, 128), Image.BICUBIC))
        truth = [open_mask(p, (128, 128)) for p in sorted(scene.glob("mask*.png"))]
        coarse = np.stack([_coarse(t, rng) for t in truth])
        before += [iou(c, t) for c, t in zip(coarse, truth)]
        after += [iou(r, t) for r, t in zip(refine_masks(img, coarse), truth)]
    assert np.mean(after) > np.mean(before) + 0.015
