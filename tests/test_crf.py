import numpy as np
import pytest
from PIL import Image

from conftest import real_scenes
from em_core.cli import main
from em_core.crf import CRFParams, crf_probabilities, refine_masks
from em_core.images import open_image, open_mask
from em_core.masks import iou
from em_core.metrics import attention_like

SCENES = real_scenes()


def _coarse(mask, rng):
    return attention_like(mask, rng)


@pytest.mark.skipif(not SCENES, reason="../shared/data/scenes is not beside the checkout")
@pytest.mark.parametrize("max_side", [None, 256])
def test_crf_brings_coarse_masks_closer_to_human_masks_on_real_photos(max_side):
    """At the photos' own side and with the default working side of 256 px (scored at full size)."""
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
    # Measured at +6.5 (own side) and +8.3 (256 px) IoU points: benchmarks/crf_real_photos.py.
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
    """CutLER's settings are in pixels; at 128 px they still improve the coarse masks.

    (Scaling the spatial deviations with the image side was tried and measured worse:
    +4.9 IoU points at 128 px scaled against +9.0 unscaled.)
    """
    rng = np.random.default_rng(0)
    before, after = [], []
    for scene in SCENES:
        img = np.asarray(open_image(scene / "img.jpg").resize((128, 128), Image.BICUBIC))
        truth = [open_mask(p, (128, 128)) for p in sorted(scene.glob("mask*.png"))]
        coarse = np.stack([_coarse(t, rng) for t in truth])
        before += [iou(c, t) for c, t in zip(coarse, truth)]
        after += [iou(r, t) for r, t in zip(refine_masks(img, coarse), truth)]
    assert np.mean(after) > np.mean(before) + 0.03
