"""The tiny world: seeded procedural scenes with an exact mask per object and a caption.

1-4 objects (shape, colour, surface pattern, size, possibly overlapping; later ones on top)
on a textured background, e.g. "a red striped circle and a blue square on grass". Some shapes
are held out of the model's training so they can serve as new concepts to learn.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 210), "yellow": (230, 200, 40),
           "purple": (140, 50, 170), "orange": (240, 130, 30), "white": (235, 235, 235), "black": (25, 25, 25)}
PATTERNS = ("plain", "striped", "dotted")
TRAIN_SHAPES = ("circle", "square", "triangle", "diamond")
# Never in the model's training captions; in its images only for worlds trained with unnamed
# objects (`train-tiny-world --unnamed-share`), as Stable Diffusion has seen far more than it can name.
HELD_OUT_SHAPES = ("star", "cross")
SHAPES = TRAIN_SHAPES + HELD_OUT_SHAPES
BACKGROUNDS = ("grass", "sand", "water", "brick", "snow")
WORDS = tuple(COLOURS) + PATTERNS + SHAPES + BACKGROUNDS + ("a", "and", "on", "photo", "of", "in", "with", "the")


@dataclass
class SceneObject:
    colour: str
    shape: str
    pattern: str = "plain"
    shape_named: bool = True  # False: the caption says "a purple striped", not which shape
    noun: str | None = None  # said in the shape's place ("a purple striped the"); None: the shape

    @property
    def phrase(self) -> str:
        pat = "" if self.pattern == "plain" else f"{self.pattern} "
        if not self.shape_named:
            return f"a {self.colour} {pat}".rstrip()
        return f"a {self.colour} {pat}{self.noun or self.shape}"


@dataclass
class Scene:
    image: Image.Image
    masks: dict  # phrase / background word -> (H, W) bool; visible pixels only
    caption: str
    objects: list = field(default_factory=list)
    background: str = "grass"


def _polygon(shape: str, box) -> list | None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t), (cx + t, cy + t),
                (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape in SHAPES:
        draw.polygon(_polygon(shape, box), fill=fill)
    else:
        raise ValueError(f"shape: unknown {shape!r}; known: {', '.join(SHAPES)}")


def _surface(colour: str, pattern: str, size: int, rng) -> np.ndarray:
    base = np.array(COLOURS[colour], np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    other = base * 0.45 if colour != "black" else np.array([200, 200, 200], np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "striped":
        period = max(4, size // 10)
        img[(yy // (period // 2)) % 2 == 1] = other
    elif pattern == "dotted":
        period = max(5, size // 8)
        cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
        img[cy**2 + cx**2 <= (period / 4) ** 2] = other
    return img


def _background(kind: str, size: int, rng) -> np.ndarray:
    n = rng.random((size, size, 1), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "grass":
        img = np.array([40, 120, 40]) + n * np.array([40, 50, 30])
    elif kind == "sand":
        img = np.array([190, 160, 100]) + n * np.array([35, 30, 25])
    elif kind == "water":
        wave = (np.sin(xx / 3.0 + yy / 5.0 + rng.uniform(0, 6)) * 0.5 + 0.5)[..., None]
        img = np.array([30, 90, 150]) + wave * np.array([30, 40, 50]) + n * 10
    elif kind == "brick":
        mortar = ((yy % 8) == 0) | (((xx + 8 * ((yy // 8) % 2)) % 16) == 0)
        img = np.where(mortar[..., None], np.array([170, 170, 160]), np.array([150, 60, 45])) + n * 15
    elif kind == "snow":
        img = np.array([215, 220, 230]) + n * np.array([25, 25, 20])
    else:
        raise ValueError(f"background: unknown {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return np.clip(img, 0, 255).astype(np.float32)


def objects_text(objects) -> str:
    """The objects' part of a caption, shared by every caption form so they name objects alike."""
    return " and ".join(o.phrase for o in objects)


def scene_caption(objects, background: str) -> str:
    """A scene's caption: its objects' phrases, then where they are."""
    return objects_text(objects) + f" on {background}"


def render(objects: list[SceneObject], background: str = "grass", size: int = 64, seed: int = 0,
           boxes: list | None = None) -> Scene:
    """Draws `objects` (later on top) at `boxes` or at random sizes and places; exact visible masks."""
    rng = np.random.default_rng(seed)
    canvas = _background(background, size, rng)
    masks: dict = {}
    for k, obj in enumerate(objects):
        if boxes is not None:
            box = boxes[k]
        else:
            side = rng.uniform(0.28, 0.55) * size
            x0, y0 = rng.uniform(0, size - side, 2)
            box = (x0, y0, x0 + side, y0 + side)
        layer = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(layer), obj.shape, box, 255)
        m = np.asarray(layer) > 127
        canvas[m] = _surface(obj.colour, obj.pattern, size, rng)[m]
        for other in masks.values():
            other &= ~m
        key = obj.phrase
        while key in masks:  # two alike objects keep separate masks
            key += "'"
        masks[key] = m
    masks[background] = ~np.any(np.stack(list(masks.values())), axis=0) if masks else np.ones((size, size), bool)
    caption = scene_caption(objects, background)
    image = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8), "RGB")
    return Scene(image, masks, caption, list(objects), background)


def random_scene(seed: int, size: int = 64, n_objects: int | None = None, shapes=TRAIN_SHAPES,
                 max_overlap: float = 0.3) -> Scene:
    """A seeded random scene; every object keeps at least 1 - max_overlap of its own pixels visible."""
    rng = np.random.default_rng(seed)
    n = n_objects or int(rng.integers(1, 5))
    for attempt in range(50):
        objects = [SceneObject(str(rng.choice(list(COLOURS))), str(rng.choice(list(shapes))),
                               str(rng.choice(PATTERNS, p=[0.6, 0.2, 0.2]))) for _ in range(n)]
        scene = render(objects, str(rng.choice(BACKGROUNDS)), size, seed=int(rng.integers(1 << 31)))
        visible = [m.sum() for k, m in scene.masks.items() if k != scene.background]
        if min(visible) >= 0.06 * size * size * (1 - max_overlap):
            return scene
    return scene


def unnamed(scene: Scene, shapes=HELD_OUT_SHAPES, colour: bool = False, word: str | None = None) -> Scene:
    """The scene with its objects of `shapes` left out of its caption, objects and masks: their pixels
    stay drawn and stay out of the background's mask, so nothing the caption says covers them.
    `colour`: such objects stay, their colour and pattern named and their shape not ("a purple
    striped and a red circle on grass"), so every colour the image shows is still said.
    `word`: such objects stay, one shared word said for every shape of `shapes` ("a purple striped
    the"), as a class noun is for the instances Stable Diffusion cannot name."""
    if colour or word:
        objects = [o if o.shape not in shapes else replace(o, shape_named=False) if colour else replace(o, noun=word)
                   for o in scene.objects]
        return Scene(scene.image, scene.masks, scene_caption(objects, scene.background), objects, scene.background)
    keys = [k for k in scene.masks if k != scene.background]
    keep = [(o, k) for o, k in zip(scene.objects, keys) if o.shape not in shapes]
    if len(keep) == len(scene.objects):
        return scene
    masks = {k: scene.masks[k] for _, k in keep}
    masks[scene.background] = scene.masks[scene.background]
    objects = [o for o, _ in keep]
    return Scene(scene.image, masks, scene_caption(objects, scene.background), objects, scene.background)


def make_scene(objects=(("red", "circle"), ("blue", "square")), background: str = "grass", size: int = 64,
               seed: int = 0) -> Scene:
    """Objects side by side without overlap: the simple scenes of the demo and the tests."""
    rng = np.random.default_rng(seed)
    slot = size / len(objects)
    boxes = []
    for k in range(len(objects)):
        side = rng.uniform(0.55, 0.8) * min(slot, size * 0.6)
        x0 = k * slot + rng.uniform(0, slot - side)
        y0 = rng.uniform(0.1 * size, 0.9 * size - side)
        boxes.append((x0, y0, x0 + side, y0 + side))
    objs = [SceneObject(c, s) for c, s in objects]
    scene = render(objs, background, size, seed, boxes)
    # Keys as "red circle" for these simple scenes.
    scene.masks = {(k[2:] if k.startswith("a ") else k): v for k, v in scene.masks.items()}
    return scene
