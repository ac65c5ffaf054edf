"""A tiny world's VAE decoder tuned on renders of every shape, its encoder left as it was.

The worlds' VAEs were trained on the named shapes only (`TRAIN_SHAPES`), yet the unnamed worlds'
denoisers draw stars and crosses too: their decoder, never shown a star, turns a star's latent into
something the checker reads as a cross about one time in five. The encoder, and so every latent the
denoiser and the concept tokens are trained on, stays as it was: only what the checker is shown of
a latent changes, never what is learned.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..provenance import begin, provenance
from .checker import SHAPE_NAMES, load_checker

# The model's own files; a world folder's results (eval_*, curve/, notes) stay behind.
MODEL_FILES = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "checker.safetensors",
               "checker.json", "training.json")
SCENE_SEED = 55_000_000  # apart from the world's own training scenes and the checker's


@torch.no_grad()
def roundtrip_by_shape(vae, checker, n: int = 512) -> dict:
    """Per shape, the share of VAE round trips of fresh single-object renders the checker reads as it
    (the renders of the world card's reconstruction check)."""
    from .world_train import round_trips

    _, rec, _, shape = round_trips(vae, n)
    _, ps = checker(rec)
    read = ps.argmax(1)
    out = {}
    for k, name in enumerate(SHAPE_NAMES):
        sel = shape == k
        out[name] = {"n": int(sel.sum()), "right": float((read[sel] == k).float().mean()) if sel.any() else None,
                     "read": dict(Counter(SHAPE_NAMES[i] for i in read[sel].tolist()).most_common(3))}
    return out


def load_world_vae(model: str | Path):
    """A tiny world folder's VAE and checker, refused by name where the folder lacks either."""
    from diffusers import AutoencoderKL

    model = Path(model)
    if not (model / "vae").is_dir() or not (model / "checker.safetensors").is_file():
        raise ValueError(f"model: {model} is not a tiny world folder (it needs vae/ and checker.safetensors; "
                         f"give one that `train-tiny-world` wrote)")
    return AutoencoderKL.from_pretrained(model / "vae"), load_checker(model / "checker.safetensors")


def tune_decoder(model: str | Path, out: str | Path, steps: int = 300, lr: float = 3e-4, batch: int = 32,
                 seed: int = 0, log=print, check_images: int = 512) -> dict:
    """Copies the world in `model` to `out` (a new folder) with its decoder tuned for `steps` steps
    of L1 on renders of scenes drawn from every shape; returns the record added to training.json
    (with the checker's reading of `check_images` round trips before and after)."""
    from .world_train import vae_pixels

    begin()
    model, out = Path(model), Path(out)
    vae, checker = load_world_vae(model)
    if out.exists():
        raise ValueError(f"out: {out} already exists; give a new folder (the tuned world is written whole)")
    if steps < 1 or lr <= 0 or batch < 1 or check_images < 1:
        raise ValueError(f"steps {steps}, lr {lr}, batch {batch}, check_images {check_images}: each must be positive")
    before = roundtrip_by_shape(vae, checker, check_images)
    vae.requires_grad_(False)
    tuned = list(vae.decoder.parameters()) + (list(vae.post_quant_conv.parameters())
                                               if vae.post_quant_conv is not None else [])
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tuned, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.time()
    vae.train()
    for step in range(steps):
        first = SCENE_SEED + seed * 10_000_000 + step * batch
        x = vae_pixels(first, batch, all_shapes=True)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        loss = (vae.decode(z).sample - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"decoder step {step + 1} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)
    after = roundtrip_by_shape(vae, checker, check_images)
    record = {"from": str(model), "steps": steps, "lr": lr, "batch": batch, "seed": seed,
              "seconds": round(time.time() - t0), "check_images": check_images,
              "loss_first_50": float(np.mean(losses[:50])),
              "loss_last_50": float(np.mean(losses[-50:])), "roundtrip_before": before, "roundtrip_after": after,
              "command": f"python -m em_core tune-world-decoder --model {model} --out {out} --steps {steps} "
                         f"--lr {lr:g} --batch {batch} --seed {seed}"}
    _write(model, out, vae, record)
    return record


def _write(model: Path, out: Path, vae, record: dict) -> None:
    """The world copied beside `out`, the tuned VAE and the record added, then renamed into place."""
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in MODEL_FILES:
        src = model / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    vae.save_pretrained(tmp / "vae")
    training = json.loads((tmp / "training.json").read_text()) if (tmp / "training.json").is_file() else {}
    training["decoder_tune"] = record
    (tmp / "training.json").write_text(json.dumps(training), encoding="utf-8")
    (tmp / "README.md").write_text(card(record), encoding="utf-8")
    settings = {k: record[k] for k in ("steps", "lr", "batch", "seed", "check_images")}
    (tmp / "decoder_tune.json").write_text(json.dumps({**record, **provenance(config=settings)}), encoding="utf-8")
    tmp.rename(out)


def card(record: dict) -> str:
    def right(which, shape):
        v = record[which][shape]["right"]
        return "-" if v is None else f"{v:.3f}"
    rows = "\n".join(f"| {s} | {right('roundtrip_before', s)} | {right('roundtrip_after', s)} |" for s in SHAPE_NAMES)
    return f"""# {record['from']} with its VAE decoder tuned on every shape

The world of `{record['from']}` (its card and training record there; `training.json` here is its
record with `decoder_tune` added; `decoder_tune.json` holds that record with its command, commit and
machine). Only the VAE decoder differs: {record['steps']} steps of L1 on renders of
scenes drawn from all six shapes (batch {record['batch']}, AdamW lr {record['lr']:g}, seed {record['seed']},
{record['seconds']} s on the CPU), the encoder frozen, so every latent the denoiser and the concept tokens
are trained on is the same as there. What changes is every image decoded from a generated latent: the
checker's read-backs, and the class images of a fine-tune's prior preservation (encoded again to train).

    {record['command']}

L1 over each 50-step window: first {record['loss_first_50']:.4f}, last {record['loss_last_50']:.4f}.
The checker's reading of {record['check_images']} VAE round trips of fresh single-object renders,
share read right per shape:

| shape | before | after |
|---|---|---|
{rows}
"""
