import numpy as np
import pytest
from PIL import Image

from em_core.dataset import prepare_image
from em_core.images import open_image, working_size


def _save(tmp_path, img, name):
    p = tmp_path / name
    img.save(p)
    return p


def test_every_common_mode_becomes_rgb(tmp_path):
    grey = Image.fromarray(np.full((10, 12), 77, np.uint8), "L")
    rgba = Image.new("RGBA", (12, 10), (255, 0, 0, 0))
    sixteen = Image.fromarray(np.full((10, 12), 65535, np.uint16))
    pal = Image.new("RGB", (12, 10), (0, 0, 255)).convert("P")
    for img, name in [(grey, "g.png"), (rgba, "a.png"), (sixteen, "16.png"), (pal, "p.png")]:
        out = open_image(_save(tmp_path, img, name))
        assert out.mode == "RGB" and out.size == (12, 10)
    assert open_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert open_image(tmp_path / "16.png").getpixel((0, 0)) == (255, 255, 255)  # 16-bit full scale
    assert open_image(tmp_path / "p.png").getpixel((0, 0)) == (0, 0, 255)


def test_unreadable_and_truncated_images_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable image"):
        open_image(bad)
    good = _save(tmp_path, Image.new("RGB", (64, 64), (1, 2, 3)), "good.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable image"):
        open_image(cut)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image(tmp_path / "missing.png")


def test_working_size_keeps_aspect_and_area_without_cropping():
    assert working_size(512, 512, 512, 64) == (512, 512)
    assert working_size(1024, 1024, 512, 64) == (512, 512)
    w, h = working_size(1200, 800, 512, 64)
    assert (w, h) == (640, 448) and w % 64 == 0 and h % 64 == 0
    assert abs(w / h - 1.5) / 1.5 < 0.1
    assert working_size(30, 2000, 512, 64)[0] == 64  # never below one unit


def test_images_of_different_sizes_and_shapes_are_prepared(bundle, tmp_path):
    a = _save(tmp_path, Image.new("RGB", (200, 100), (9, 9, 9)), "wide.png")
    b = _save(tmp_path, Image.new("L", (50, 90), 200), "tall.png")
    wide = prepare_image(bundle, a, "[v1] in [v2]")
    tall = prepare_image(bundle, b, "[v1]")
    assert wide.size == (88, 48) and wide.original_size == (200, 100)
    assert wide.latent_hw == (12, 22) and tall.latent_hw[0] > tall.latent_hw[1]
    assert wide.latent_mean.shape[0] == 2  # plain and flipped
    assert wide.rgb.shape == (48, 88, 3)


def test_dark_16bit_stays_dark_and_masks_read_cutouts_from_alpha(tmp_path):
    dark = Image.fromarray(np.full((4, 4), 200, np.uint16))
    assert open_image(_save(tmp_path, dark, "dark16.png")).getpixel((0, 0))[0] == 1  # 200/65535*255
    from em_core.images import open_mask

    cut = np.zeros((8, 8, 4), np.uint8)
    cut[2:6, 2:6] = (255, 255, 255, 255)  # white square, transparent elsewhere
    assert open_mask(_save(tmp_path, Image.fromarray(cut, "RGBA"), "cut.png")).sum() == 16
    alpha_only = np.zeros((8, 8, 4), np.uint8)
    alpha_only[2:6, 2:6, 3] = 255  # black but opaque square
    assert open_mask(_save(tmp_path, Image.fromarray(alpha_only, "RGBA"), "alpha.png")).sum() == 16
    opaque = np.zeros((8, 8, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[:4, :, :3] = 255
    assert open_mask(_save(tmp_path, Image.fromarray(opaque, "RGBA"), "opaque.png")).sum() == 32
