"""Procedural scenes with exact masks: a few coloured shapes on a textured background.

Small on purpose; it gives the offline demo and the tests images whose true masks are known.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "blue": (40, 60, 210), "yellow": (230, 200, 40), "white": (235, 235, 235)}
BACKGROUNDS = {"grass": ((40, 120, 40), (70, 160, 60)), "sand": ((190, 160, 100), (220, 190, 130))}


@dataclass
class Scene:
    image: Image.Image
    masks: dict  # word -> (H, W) bool, one per object, plus the background
    caption: str


def _shape(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"shape: unknown kind {kind!r}")


def make_scene(objects=(("red", "circle"), ("blue", "square")), background: str = "grass", size: int = 64,
               seed: int = 0) -> Scene:
    """Objects placed side by side without overlap on a noisy background; later objects on top."""
    rng = np.random.default_rng(seed)
    lo, hi = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[background])
    noise = rng.random((size, size, 1), dtype=np.float32)
    bg = (lo + (hi - lo) * noise).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    masks, words = {}, []
    slot = size / len(objects)
    for k, (colour, kind) in enumerate(objects):
        side = rng.uniform(0.55, 0.8) * min(slot, size * 0.6)
        x0 = k * slot + rng.uniform(0, slot - side)
        y0 = rng.uniform(0.1 * size, 0.9 * size - side)
        box = (x0, y0, x0 + side, y0 + side)
        _shape(ImageDraw.Draw(img), kind, box, COLOURS[colour])
        layer = Image.new("L", img.size, 0)
        _shape(ImageDraw.Draw(layer), kind, box, 255)
        m = np.asarray(layer) > 127
        for other in masks.values():
            other &= ~m
        masks[f"{colour} {kind}"] = m
        words.append(f"a {colour} {kind}")
    masks[background] = ~np.any(np.stack(list(masks.values())), axis=0)
    return Scene(img, masks, " and ".join(words) + f" on {background}")
