"""Reading user images and masks into the engine's working size.

Policy: no cropping. An image is scaled, aspect kept, so that its area is about
`resolution`^2, then each side is rounded to the nearest multiple the model needs
(VAE factor x U-Net depth, 64 px for SD); the rounding stretches it by a few percent at
most. Masks are written back at the original image size.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit by mode, whatever the pixel values: a dark 16-bit image must stay dark.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white rather than whatever colour hides under alpha 0.
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(base, rgba)
    return img.convert("RGB")


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """An RGB PIL image from any file PIL reads: grey, RGBA, 16-bit and palette included."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist or is not a file")
    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:  # an animated GIF, APNG or WebP, or a multi-page TIFF: PIL opens on frame 1
                warnings.warn(f"{what}: {path} has {frames} frames; using frame 1", stacklevel=2)
            img.load()
            return _to_rgb(img, what)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what}: {path} has more pixels than PIL opens safely ({exc}); scale it down "
                         f"(to {Image.MAX_IMAGE_PIXELS:,} pixels at most) and give it again") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{what}: {path} is not a readable image ({exc}); give a PNG or JPEG that opens") from exc


def working_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(W, H) with area ~ resolution^2, aspect kept, sides multiples of `multiple`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    scale = resolution / (width * height) ** 0.5
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return w, h


def image_to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) in [-1, 1], the VAE's input range."""
    arr = np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_to_uint8(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img.resize(size, Image.BICUBIC), dtype=np.uint8))


def open_mask(path: str | Path, size: tuple[int, int] | None = None, what: str = "mask",
              image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean (H, W) mask, > 127 (of 255) inside, resized to `size` (W, H).

    Grey levels are read from the image; a mask with varying transparency is read from its
    alpha channel (a cut-out), one with constant alpha from its colour. With `image_size` (W, H),
    the size of the image the mask belongs to, a mask of another size is refused rather than
    stretched. A mask that covers the whole image is accepted with a warning.
    """
    path = Path(path)
    img = open_image(path, what).convert("L")
    if image_size is not None and tuple(img.size) != tuple(image_size):
        raise ValueError(f"{what}: {path} is {img.size[0]}x{img.size[1]} pixels, but its image is "
                         f"{image_size[0]}x{image_size[1]}; give a mask of the image's own size")
    with Image.open(path) as raw:
        if raw.mode in ("RGBA", "LA", "PA") or (raw.mode == "P" and "transparency" in raw.info):
            alpha = np.asarray(raw.convert("RGBA"))[..., 3]
            if alpha.min() != alpha.max():  # a cut-out: the alpha channel is the mask
                img = Image.fromarray(alpha, "L")
    if size is not None and img.size != size:
        img = img.resize(size, Image.BILINEAR)
    mask = np.asarray(img) > 127
    if mask.all():
        warnings.warn(f"{what}: {path} is white everywhere, so the concept is the whole image; a mask marks "
                      "the concept's pixels in white and the rest in black", stacklevel=2)
    return mask


def mask_to_image(mask: np.ndarray | torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """A greyscale PNG-ready image of a [0, 1] mask, resized to `size` (W, H) if given."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().float().cpu().numpy()
    img = Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8), "L")
    if size is not None and img.size != size:
        img = img.resize(size, Image.BILINEAR)
    return img
