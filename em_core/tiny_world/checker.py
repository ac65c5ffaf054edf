"""The tiny world's fidelity checker: a small CNN that reads a render and names the colour and
shape of its main object. Trained on procedural single-object scenes (all shapes, held-out
ones included: it judges images, it is not the generative model)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .scenes import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, SceneObject, render

COLOUR_NAMES, SHAPE_NAMES = list(COLOURS), list(SHAPES)


class Checker(nn.Module):
    def __init__(self):
        super().__init__()
        c = 32
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.colour = nn.Linear(4 * c, len(COLOUR_NAMES))
        self.shape = nn.Linear(4 * c, len(SHAPE_NAMES))

    def forward(self, x):
        f = self.body(x)
        return self.colour(f), self.shape(f)


def _batch(seed: int, n: int):
    rng = np.random.default_rng(seed)
    xs, cs, ss = [], [], []
    for i in range(n):
        obj = SceneObject(str(rng.choice(COLOUR_NAMES)), str(rng.choice(SHAPE_NAMES)), str(rng.choice(PATTERNS)))
        scene = render([obj], str(rng.choice(BACKGROUNDS)), 64, seed=int(rng.integers(1 << 31)))
        xs.append(np.asarray(scene.image, np.float32) / 127.5 - 1)
        cs.append(COLOUR_NAMES.index(obj.colour))
        ss.append(SHAPE_NAMES.index(obj.shape))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    return x, torch.tensor(cs), torch.tensor(ss)


def train_checker(seconds: float = 120, seed: int = 0, log=print) -> tuple[Checker, dict]:
    torch.manual_seed(seed)
    net = Checker()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    step, start = 0, time.time()
    while time.time() - start < seconds:
        x, c, s = _batch(seed * 1_000_000 + step * 64, 64)
        pc, ps = net(x)
        loss = nn.functional.cross_entropy(pc, c) + nn.functional.cross_entropy(ps, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"checker step {step} loss {loss.item():.3f}")
    net.eval()
    acc = accuracy(net, *_batch(seed * 1_000_000 + 999_000_000, 512))
    acc["steps"] = step
    return net, acc


@torch.no_grad()
def accuracy(net: "Checker", x: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> dict:
    """Fractions of images (B, 3, 64, 64) in [-1, 1] whose colour and shape the checker reads right."""
    pc, ps = net(x)
    return {"colour": float((pc.argmax(1) == colour).float().mean()),
            "shape": float((ps.argmax(1) == shape).float().mean())}


def save_checker(net: Checker, path: str | Path, meta: dict) -> None:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={k: str(v) for k, v in meta.items()})


def train_and_save_checker(path: str | Path, seconds: float = 150, seed: int = 0) -> dict:
    """Trains a checker and writes PATH (.safetensors) and PATH's .json twin with its accuracy."""
    import json

    net, acc = train_checker(seconds=seconds, seed=seed, log=lambda *a: None)
    path = Path(path)
    save_checker(net, path, acc)
    path.with_suffix(".json").write_text(json.dumps(acc), encoding="utf-8")
    return acc


def load_checker(path: str | Path) -> Checker:
    net = Checker()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def judge(net: Checker, images) -> list[tuple[str, str]]:
    """(colour, shape) read from each PIL image."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((64, 64)), np.float32) / 127.5 - 1
                                   for im in images])).permute(0, 3, 1, 2)
    pc, ps = net(x)
    return [(COLOUR_NAMES[a], SHAPE_NAMES[b]) for a, b in zip(pc.argmax(1).tolist(), ps.argmax(1).tolist())]
