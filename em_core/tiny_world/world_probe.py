"""Does a tiny-world model bind its words to their objects? The three gates of the world model
(issue 14), measured on held-out scenes with fixed seeds:

- binding: for each object's colour word and shape word in a multi-object caption, the AUROC of
  its cross-attention map ranking its own object's pixels above the other objects' pixels, per
  group of layers (down / mid / up / all) and timestep range;
- text use: the relative drop of the fixed-noise denoising loss with the true caption against the
  empty prompt, over the upper half of the schedule (t >= 500) and over all t;
- readback: single-object captions generated and read back by the checker (colour, shape),
  `evaluate.caption_fidelity`.

    python benchmarks/world_binding.py --model em_core/tiny_world/model
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import LAYERS_ALL, AttentionCapture, selected_maps
from .scenes import TRAIN_SHAPES, random_scene

GROUPS = ("down", "mid", "up", "all")


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    ranks = np.empty(len(scores))
    ranks[scores.argsort(kind="mergesort")] = np.arange(1, len(scores) + 1)
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]  # tied scores share their mean rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


class _LayerMaps:
    """Keeps each captured layer's word maps (B, K, h, w), averaged over heads."""

    def __init__(self, select: torch.Tensor, latent_hw, layers: dict[str, int]):
        self.select, self.latent_hw, self.layers = select, latent_hw, layers
        self.by_layer: dict[str, torch.Tensor] = {}
        self.closed = False

    def add(self, name: str, probs: torch.Tensor) -> None:
        f = self.layers[name]
        maps = selected_maps(probs, self.select, (self.latent_hw[0] // f, self.latent_hw[1] // f))
        if f != 1:
            maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)
        self.by_layer[name] = maps.float()


def _group(name: str) -> str:
    return "mid" if name.startswith("mid_block") else name.split("_")[0]


def _encode(bundle, captions: list[str]):
    tok = bundle.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return ids, bundle.text_encoder(ids)[0]


def _latents(bundle, scenes) -> torch.Tensor:
    from .world_train import scene_pixels

    return bundle.vae.encode(scene_pixels(scenes)).latent_dist.mean * bundle.vae.config.scaling_factor


@torch.no_grad()
def binding(bundle, n_scenes: int = 24, timesteps=(100, 300, 500, 700, 900), seed: int = 50_000) -> dict:
    """Own-vs-other AUROC of colour and shape words' maps, per layer group and timestep."""
    scenes = [random_scene(seed + i, n_objects=2 + i % 2, shapes=TRAIN_SHAPES, max_overlap=0.2)
              for i in range(n_scenes)]
    z0 = _latents(bundle, scenes)
    hw = tuple(z0.shape[-2:])
    ids, hidden = _encode(bundle, [s.caption for s in scenes])
    # Word positions: one token per word after the start token.
    words, owner, kind = [], [], []
    for s in scenes:
        w, o, k, pos = [], [], [], 1
        keys = [m for m in s.masks if m != s.background]
        for obj_i, obj in enumerate(s.objects):
            phrase = obj.phrase.split(" ")
            w += [pos + 1, pos + len(phrase) - 1]
            o += [obj_i, obj_i]
            k += ["colour", "shape"]
            pos += len(phrase) + 1
        words.append(w), owner.append(o), kind.append(k)
    n_tok = max(len(w) for w in words)
    select = torch.zeros(len(scenes), ids.shape[1], n_tok)
    for i, w in enumerate(words):
        for t, p in enumerate(w):
            select[i, p, t] = 1
    own = []  # per scene: (n_objects, h, w) bool at the latent grid
    for s in scenes:
        keys = [m for m in s.masks if m != s.background]
        m = torch.from_numpy(np.stack([s.masks[k] for k in keys]).astype(np.float32))[None]
        own.append((F.interpolate(m, size=hw, mode="area")[0] > 0.5).numpy())
    gen = torch.Generator().manual_seed(seed)
    result = {}
    with AttentionCapture(bundle.unet, LAYERS_ALL) as cap:
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=gen)
            tt = torch.full((len(scenes),), t, dtype=torch.long)
            store = _LayerMaps(select, hw, cap.layers)
            cap.slot[0] = store
            bundle.unet(bundle.scheduler.add_noise(z0, noise, tt), tt, encoder_hidden_states=hidden)
            cap.slot[0] = None
            for group in GROUPS:
                names = [n for n in store.by_layer if group == "all" or _group(n) == group]
                if not names:
                    continue
                maps = torch.stack([store.by_layer[n] for n in names]).mean(0).numpy()
                for word_kind in ("colour", "shape"):
                    scores = []
                    for i in range(len(scenes)):
                        for tk, (o, k) in enumerate(zip(owner[i], kind[i])):
                            if k != word_kind:
                                continue
                            mine = own[i][o]
                            others = np.any(np.delete(own[i], o, axis=0), axis=0) & ~mine
                            scores.append(auroc(maps[i, tk][mine], maps[i, tk][others]))
                    result.setdefault(group, {}).setdefault(word_kind, {})[int(t)] = float(np.nanmean(scores))
    for group, kinds in result.items():
        for word_kind, per_t in kinds.items():
            vals = {k: v for k, v in per_t.items() if isinstance(k, int)}
            per_t["mean"] = float(np.mean(list(vals.values())))
            per_t["low_t"] = float(np.mean([v for k, v in vals.items() if k <= 500]))
    return result


@torch.no_grad()
def text_use(bundle, n_scenes: int = 32, n_t: int = 16, seed: int = 60_000) -> dict:
    """Relative drop of the fixed-noise denoising loss, true caption against the empty prompt."""
    scenes = [random_scene(seed + i, shapes=TRAIN_SHAPES) for i in range(n_scenes)]
    z0 = _latents(bundle, scenes)
    _, cond = _encode(bundle, [s.caption for s in scenes])
    _, empty = _encode(bundle, [""] * len(scenes))
    gen = torch.Generator().manual_seed(seed)
    n_train = bundle.scheduler.config.num_train_timesteps
    per_t = {"cond": [], "empty": [], "t": []}
    for j in range(n_t):
        t = int((j + 0.5) * n_train / n_t)
        noise = torch.randn(z0.shape, generator=gen)
        tt = torch.full((len(scenes),), t, dtype=torch.long)
        noisy = bundle.scheduler.add_noise(z0, noise, tt)
        for key, h in (("cond", cond), ("empty", empty)):
            pred = bundle.unet(noisy, tt, encoder_hidden_states=h).sample
            per_t[key].append(float(F.mse_loss(pred, noise)))
        per_t["t"].append(t)
    c, e, t = (np.array(per_t[k]) for k in ("cond", "empty", "t"))
    upper = t >= n_train // 2
    return {"drop_upper_half": float(1 - c[upper].mean() / e[upper].mean()),
            "drop_all_t": float(1 - c.mean() / e.mean()),
            "loss_cond_upper": float(c[upper].mean()), "loss_empty_upper": float(e[upper].mean()),
            "per_t": per_t}
