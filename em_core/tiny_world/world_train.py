"""Training the tiny world's model: a latent diffusion model of Stable Diffusion's own classes
(AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel + CLIPTokenizer with
the world's vocabulary) on procedural scenes, on the CPU, within a time budget.

    python -m em_core train-tiny-world --out em_core/tiny_world/model --minutes 45

Phase 1 trains the VAE (L1 reconstruction + a small KL term), then the latent scale is set
from the encoded latents' spread; phase 2 trains the U-Net and the text encoder together with
the epsilon loss, dropping 10% of captions so classifier-free guidance works. Held-out shapes
(scenes.HELD_OUT_SHAPES) never appear.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..attention import selected_maps
from ..model_io import ModelBundle
from .scenes import HELD_OUT_SHAPES, SHAPES, TRAIN_SHAPES, WORDS, objects_text, random_scene, scene_caption, unnamed
from .tiny_model import SD_SCHEDULER, save_bundle
from .tokenizer_build import save_tokenizer

WORLD = dict(
    size=64, max_length=32,
    unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             layers_per_block=1, norm_num_groups=16, sample_size=64),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64),
)


def build_world_model(seed: int = 0) -> ModelBundle:
    with tempfile.TemporaryDirectory() as tmp:
        tok = save_tokenizer(tmp, words=WORDS, max_length=WORLD["max_length"])
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=WORLD["max_length"],
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **WORLD["text"]))
    return ModelBundle((tok,), (text,), UNet2DConditionModel(**WORLD["unet"]), AutoencoderKL(**WORLD["vae"]),
                       DDPMScheduler(**SD_SCHEDULER), source="tiny-world")


def scene_pixels(scenes) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], as the VAE takes them."""
    arr = np.stack([np.asarray(s.image, np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# How a scene's objects may be captioned: (the text before the first object, background named).
# The scene form is every caption the world saw up to step 6; the "a photo of" forms are the
# ones a concept's tokens are trained and generated in (Break-A-Scene's "a photo of [v1] and
# [v3]", the evaluation's "a photo of [vN]"), which a world that never read them draws badly.
CAPTION_FORMS = {"scene": ("", True), "photo": ("a photo of ", True), "photo_no_background": ("a photo of ", False)}


def caption_in_form(scene, form: str) -> str:
    prefix, background = CAPTION_FORMS[form]
    return prefix + (scene_caption(scene.objects, scene.background) if background else objects_text(scene.objects))


def caption_forms(first_seed: int, n: int, photo_share: float) -> list[str]:
    """Seeded per-item forms: `photo_share` of the captions in one of the "a photo of" forms."""
    if not 0.0 <= photo_share <= 1.0:
        raise ValueError(f"photo_share: {photo_share} is outside [0, 1]")
    rng = np.random.default_rng(first_seed)
    photo = rng.random(n) < photo_share
    kind = rng.integers(0, 2, n)
    return ["scene" if not p else ("photo", "photo_no_background")[k] for p, k in zip(photo, kind)]


def scene_batch(first_seed: int, n: int, with_scenes: bool = False, photo_share: float = 0.0,
                unnamed_share: float = 0.0, unnamed_colour: bool = False, unnamed_word: str | None = None):
    """Pixels and captions of `n` seeded scenes; with_scenes also gives the scenes and each caption's form.
    `unnamed_share`: the share of scenes drawn from every shape, the held-out ones left unnamed
    (`unnamed_colour`: their colour still said; `unnamed_word`: one word said for both; `scenes.unnamed`)."""
    if not 0.0 <= unnamed_share <= 1.0:
        raise ValueError(f"unnamed_share: {unnamed_share} is outside [0, 1]")
    every = np.random.default_rng(first_seed + 1).random(n) < unnamed_share
    scenes = [_with_unnamed(first_seed + i, unnamed_colour, unnamed_word) if e
              else random_scene(first_seed + i, size=WORLD["size"], shapes=TRAIN_SHAPES) for i, e in enumerate(every)]
    x = scene_pixels(scenes)
    forms = caption_forms(first_seed, n, photo_share)
    captions = [caption_in_form(s, f) for s, f in zip(scenes, forms)]
    return (x, captions, scenes, forms) if with_scenes else (x, captions)


def _with_unnamed(seed: int, colour: bool = False, word: str | None = None):
    """A scene of every shape with the held-out ones unnamed; one whose objects are all held out is
    drawn again from the named shapes (a caption must name a shape)."""
    scene = unnamed(random_scene(seed, size=WORLD["size"], shapes=SHAPES), colour=colour, word=word)
    if any(o.shape_named and o.noun is None for o in scene.objects):
        return scene
    return random_scene(seed, size=WORLD["size"], shapes=TRAIN_SHAPES)


def word_targets(scenes, keep: list[bool], max_length: int, latent_hw: tuple[int, int],
                 forms: list[str] | None = None):
    """Which caption position each object's colour, pattern and shape words (and the background
    word) sit at, and the visible mask each should attend to.

    The world tokenizer gives one token per word after the start token, so word j of a caption
    is position j + 1. Returns select (B, L, T), masks (B, T, h, w) at the latent grid (area
    fractions), present (B, T); dropped captions (keep False) supervise nothing. `forms`: each
    caption's CAPTION_FORMS key (default "scene").
    """
    per_item = []
    for i, (scene, k) in enumerate(zip(scenes, keep)):
        pairs = []
        if k:
            prefix, background = CAPTION_FORMS[forms[i] if forms else "scene"]
            keys = [m for m in scene.masks if m != scene.background]
            pos = 1 + len(prefix.split())
            for obj, key in zip(scene.objects, keys):
                words = obj.phrase.split(" ")  # "a", colour, [pattern], shape
                for j, _ in enumerate(words[1:], start=1):
                    pairs.append((pos + j, scene.masks[key]))
                pos += len(words) + 1  # the phrase and the "and" / "on" after it
            if background:
                pairs.append((pos, scene.masks[scene.background]))
        per_item.append([(p, m) for p, m in pairs if p < max_length - 1])
    n_tok = max(1, max(len(p) for p in per_item))
    b = len(scenes)
    select = torch.zeros(b, max_length, n_tok)
    masks = torch.zeros(b, n_tok, *latent_hw)
    present = torch.zeros(b, n_tok, dtype=torch.bool)
    for i, pairs in enumerate(per_item):
        for t, (p, m) in enumerate(pairs):
            select[i, p, t] = 1.0
            full = torch.from_numpy(m.astype(np.float32))[None, None]
            masks[i, t] = torch.nn.functional.interpolate(full, size=latent_hw, mode="area")[0, 0]
            present[i, t] = True
    return select, masks, present


class BindingStore:
    """Collects, per captured cross-attention layer, two losses of the supervised words' maps
    (averaged over heads) against their objects' masks at that layer's size:

    - Break-A-Scene's: each map divided by its max, MSE against its mask (where the word looks);
    - a competition term: at each pixel, the share of the supervised words' attention that goes
      to the words of the object (or background) the pixel belongs to, as -log (which word wins
      there). The MSE alone is met by maps that mark every object alike (measured: own-vs-other
      AUROC stayed at 0.50 while the MSE fell from 0.48 to 0.08), so this term asks for binding.
    """

    def __init__(self, layers: dict[str, int], latent_hw, select, masks, present):
        self.layers, self.latent_hw, self.select = layers, latent_hw, select
        self.masks, self.present = masks, present.float()
        self.losses: list[torch.Tensor] = []
        self.closed = False

    def add(self, name: str, probs: torch.Tensor) -> None:
        factor = self.layers[name]
        h, w = self.latent_hw[0] // factor, self.latent_hw[1] // factor
        maps = selected_maps(probs, self.select, (h, w))
        target = self.masks if factor == 1 else torch.nn.functional.avg_pool2d(self.masks, factor)
        present = self.present[..., None, None]
        peak = maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
        per = ((maps / peak - target) ** 2).flatten(2).mean(-1)
        mse = (per * self.present).sum() / self.present.sum().clamp_min(1)
        share = maps * present / (maps * present).sum(1, keepdim=True).clamp_min(1e-12)
        # The share won by the words whose mask covers the pixel (an object's words share its mask;
        # the masks of different objects and the background's do not overlap).
        right = (share * target * present).sum(1)
        cover = ((target * present).sum(1) > 0).float()
        items = (self.present.sum(1) > 0).float()[:, None, None]
        ce = -(torch.log(right.clamp_min(1e-6)) * cover * items).sum() / (cover * items).sum().clamp_min(1)
        self.losses.append(mse + ce)

    def loss(self) -> torch.Tensor:
        return torch.stack(self.losses).mean()


def vae_scenes(first_seed: int, n: int, all_shapes: bool = False) -> list:
    """The VAE's training scenes: of the named shapes, or of every shape (`all_shapes`; the held-out
    ones too, so their latents are learned as well as the others')."""
    shapes = SHAPES if all_shapes else TRAIN_SHAPES
    return [random_scene(first_seed + i, size=WORLD["size"], shapes=shapes) for i in range(n)]


def vae_pixels(first_seed: int, n: int, all_shapes: bool = False) -> torch.Tensor:
    return scene_pixels(vae_scenes(first_seed, n, all_shapes))


def train_vae(vae, seconds: float, batch: int, seed: int, log, all_shapes: bool = False) -> list:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    losses, step, start = [], 0, time.time()
    while time.time() - start < seconds:
        x = vae_pixels(seed * 10_000_000 + step * batch, batch, all_shapes)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = (rec - x).abs().mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} loss {np.mean(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def latent_scale(vae, seed: int, n: int = 256, all_shapes: bool = False) -> float:
    x = vae_pixels(seed * 10_000_000 + 9_000_000, n, all_shapes)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


def train_denoiser(bundle: ModelBundle, seconds: float, batch: int, seed: int, log, lr: float = 3e-4,
                   ema_decay: float = 0.999, attn_weight: float = 0.0, checkpoint=None,
                   checkpoint_seconds: float = 600.0, photo_share: float = 0.0, unnamed_share: float = 0.0,
                   unnamed_colour: bool = False, unnamed_word: str | None = None) -> list:
    """Epsilon loss on U-Net + text encoder; the saved weights are an exponential moving average
    (diffusers' EMAModel), which samples much better than the last step's weights.

    `attn_weight` > 0 adds a supervision of every cross-attention layer: each caption word of an
    object (colour, pattern, shape) and the background word attend to that object's exact mask
    (BindingStore). It stands in for what Stable Diffusion learns from scale (words bound to
    their objects), which this small model does not learn from captions alone; it trains the
    world model only, never the concept tokens learned later. `checkpoint(losses)` is called with
    the EMA weights in place every `checkpoint_seconds`. `photo_share`: the share of captions in
    an "a photo of" form (CAPTION_FORMS), supervised at their shifted word positions. `unnamed_share`:
    the share of scenes that may hold held-out shapes, drawn but never named (`scene_batch`).
    `unnamed_word`: one word of the world's vocabulary said for every held-out shape, bound to them
    as the shape words are to theirs.
    """
    from diffusers.training_utils import EMAModel

    from ..attention import LAYERS_ALL, AttentionCapture

    unet, text, tok, sched, vae = bundle.unet, bundle.text_encoder, bundle.tokenizer, bundle.scheduler, bundle.vae
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(seed)
    scale = vae.config.scaling_factor
    capture = AttentionCapture(unet, LAYERS_ALL) if attn_weight > 0 else None
    if capture is not None:
        capture.__enter__()
    losses, step, start, last_save = [], 0, time.time(), time.time()
    while time.time() - start < seconds:
        x, captions, scenes, forms = scene_batch(seed * 10_000_000 + 5_000_000 + step * batch, batch,
                                                 with_scenes=True, photo_share=photo_share,
                                                 unnamed_share=unnamed_share, unnamed_colour=unnamed_colour,
                                                 unnamed_word=unnamed_word)
        drop = torch.rand(batch, generator=gen) < 0.1
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(gen) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        store = None
        if capture is not None:
            sel, masks, present = word_targets(scenes, (~drop).tolist(), ids.shape[1], tuple(z.shape[-2:]), forms)
            store = BindingStore(capture.layers, tuple(z.shape[-2:]), sel, masks, present)
            capture.slot[0] = store
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        if store is not None:
            capture.slot[0] = None
            loss = loss + attn_weight * store.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        opt.step()
        ema.step(params)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"denoiser step {step} loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f}s)")
        if checkpoint is not None and time.time() - last_save > checkpoint_seconds:
            ema.store(params)
            ema.copy_to(params)
            checkpoint(losses)
            ema.restore(params)
            last_save = time.time()
    if capture is not None:
        capture.__exit__(None, None, None)
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return losses


def _previous(init_from) -> tuple[ModelBundle | None, dict | None]:
    if init_from is None:
        return None, None
    from ..model_io import load_bundle

    init_from = Path(init_from)
    record = json.loads((init_from / "training.json").read_text())
    return load_bundle(init_from), record


def _split_words(tok) -> list[str]:
    """The world's words this tokenizer does not keep whole."""
    return [w for w in WORDS if len(tok.tokenize(w)) != 1]


def _whole_word_tokenizer(tok, log):
    """The world's tokenizer rebuilt when it splits a world word and the rebuild keeps every id.

    word_targets supervises word j of a caption at position j + 1; tokenizers built before
    tokenizer_build's merge fix split "green" into four pieces, shifting every word after it.
    The rebuild only reorders merges, so "green" gets its own (so far untrained) embedding row.
    """
    split = _split_words(tok)
    if not split:
        return tok
    with tempfile.TemporaryDirectory() as tmp:
        fresh = save_tokenizer(tmp, words=WORDS, max_length=tok.model_max_length)
    if fresh.get_vocab() != tok.get_vocab():
        log(f"tokenizer: {split} split into pieces; its vocabulary differs from a rebuild, kept as it is")
        return tok
    log(f"tokenizer: {split} now one token each (merges rebuilt, every id kept)")
    return fresh


def _past_runs(before: dict | None) -> list:
    """The runs a training record holds; a record from before runs were listed is one run."""
    if before is None:
        return []
    stats = before["stats"]
    return stats.get("runs", [{k: stats[k] for k in ("seconds", "vae_steps", "denoiser_steps")}])


def _save_world(bundle, out: Path, record: dict, extras_from: Path | None = None) -> None:
    """Writes the model and its training record beside `out` and swaps it in, so a run killed
    while saving leaves the previous checkpoint whole."""
    import shutil

    tmp = out.with_name(out.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    save_bundle(bundle, tmp)
    for extra in ("checker.safetensors", "checker.json"):
        src = next((d / extra for d in (out, extras_from) if d is not None and (d / extra).is_file()), None)
        if src is not None:
            shutil.copy2(src, tmp / extra)
    (tmp / "training.json").write_text(json.dumps(record), encoding="utf-8")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train_tiny_world(out: str | Path, minutes: float = 45.0, vae_share: float = 0.15, batch: int = 64,
                     seed: int = 0, log=print, init_from: str | Path | None = None, attn_weight: float = 0.0,
                     lr: float = 3e-4, checkpoint_minutes: float = 10.0, photo_share: float = 0.0,
                     unnamed_share: float = 0.0, unnamed_colour: bool = False, unnamed_word: str | None = None,
                     vae_all_shapes: bool = False) -> dict:
    """Trains the world's model within `minutes` and saves it (diffusers format) with a card.

    `init_from`: a folder this script wrote before; training goes on from its weights (the
    data seeds move on, so it sees new scenes) and the stats add up both runs. `vae_share` 0
    keeps the VAE (and its latent scale) as it was. The EMA weights are saved every
    `checkpoint_minutes`, so a run cut off keeps what it learned; resume with `init_from=out`.
    `attn_weight`, `photo_share`, `unnamed_share`, `unnamed_colour`, `unnamed_word`: see `train_denoiser`.
    `vae_all_shapes`: the VAE's steps (and its latent scale) see every shape, the held-out ones too
    (by default only the named ones, so it blurs stars into crosses).
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    command = (f"python -m em_core train-tiny-world --out {out} --minutes {minutes} --batch {batch} --vae-share "
               f"{vae_share} --attn-weight {attn_weight} --lr {lr} --seed {seed}"
               + (f" --photo-share {photo_share}" if photo_share else "")
               + (f" --unnamed-share {unnamed_share}" if unnamed_share else "")
               + (" --unnamed-colour" if unnamed_colour else "")
               + (f" --unnamed-word {unnamed_word}" if unnamed_word else "")
               + (" --vae-all-shapes" if vae_all_shapes else "")
               + (f" --init-from {init_from}" if init_from else ""))
    bundle, before = _previous(init_from)
    if bundle is not None:
        bundle.tokenizers = (_whole_word_tokenizer(bundle.tokenizer, log),)
    bundle = bundle or build_world_model(seed)
    if unnamed_word is not None and (unnamed_word in HELD_OUT_SHAPES
                                     or len(bundle.tokenizer.tokenize(unnamed_word)) != 1):
        raise ValueError(f"unnamed_word: {unnamed_word!r} must be one token of the world's vocabulary and not a "
                         f"held-out shape's name (e.g. 'the')")
    if unnamed_word is not None and unnamed_colour:
        raise ValueError("unnamed_colour and unnamed_word: give one; the colour caption and the shared word are two "
                         "ways to say the unnamed objects (drop --unnamed-colour or --unnamed-word)")
    past = _past_runs(before)
    run = len(past)
    total = minutes * 60
    t0 = time.time()
    out = Path(out)
    vae_losses = train_vae(bundle.vae, total * vae_share, 32, seed + 1000 * run, log, vae_all_shapes)
    if vae_losses or before is None:
        bundle.vae.register_to_config(scaling_factor=latent_scale(bundle.vae, seed, all_shapes=vae_all_shapes))
    vae_final = float(np.mean(vae_losses[-50:])) if vae_losses else before["stats"]["vae_final_loss"]

    def record(den_losses: list) -> dict:
        this = {"seconds": round(time.time() - t0), "vae_steps": len(vae_losses), "command": command,
                "denoiser_steps": len(den_losses), "warm_start": str(init_from) if init_from else None,
                "attn_weight": attn_weight, "lr": lr, "photo_share": photo_share, "unnamed_share": unnamed_share,
                "unnamed_colour": unnamed_colour, "unnamed_word": unnamed_word,
                "vae_all_shapes": vae_all_shapes,
                "whole_words": not _split_words(bundle.tokenizer)}
        runs = past + [this]
        stats = {
            "seconds": sum(r["seconds"] for r in runs), "vae_steps": sum(r["vae_steps"] for r in runs),
            "vae_batch": 32, "vae_final_loss": vae_final,
            "denoiser_steps": sum(r["denoiser_steps"] for r in runs), "denoiser_batch": batch,
            "denoiser_final_loss": float(np.mean(den_losses[-100:])) if den_losses else None,
            "latent_scale": bundle.vae.config.scaling_factor, "seed": seed, "threads": torch.get_num_threads(),
            "runs": runs,
            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in
                       (("unet", bundle.unet), ("vae", bundle.vae), ("text_encoder", bundle.text_encoder))},
        }
        return {"stats": stats, "vae_losses": (before["vae_losses"] if before else []) + vae_losses,
                "denoiser_losses": (before["denoiser_losses"] if before else []) + list(den_losses)}

    def checkpoint(den_losses):
        _save_world(bundle, out, record(den_losses), Path(init_from) if init_from else None)
        log(f"checkpoint: {len(den_losses)} denoiser steps saved to {out}")

    den_losses = train_denoiser(bundle, total - (time.time() - t0), batch, seed + 1000 * run, log, lr=lr,
                                attn_weight=attn_weight, checkpoint=checkpoint,
                                checkpoint_seconds=checkpoint_minutes * 60, photo_share=photo_share,
                                unnamed_share=unnamed_share, unnamed_colour=unnamed_colour,
                                unnamed_word=unnamed_word)
    final = record(den_losses)
    _save_world(bundle, out, final, Path(init_from) if init_from else None)
    log(json.dumps(final["stats"]))
    return final["stats"]


@torch.no_grad()
def reconstruction_check(vae, model_dir, n: int = 256) -> dict | None:
    """What the checker reads from VAE round trips of fresh single-object renders: the ceiling of
    what any denoiser on these latents can show it."""
    from .checker import accuracy, load_checker

    path = Path(model_dir) / "checker.safetensors"
    if not path.is_file():
        return None
    x, rec, colour, shape = round_trips(vae, n)
    return {"l1": float((rec - x).abs().mean()), **accuracy(load_checker(path), rec, colour, shape)}


@torch.no_grad()
def round_trips(vae, n: int, seed: int = 777):
    """`n` fresh single-object renders (the checker's kind), their VAE round trips, colours and shapes."""
    from .checker import _batch

    x, colour, shape = _batch(seed, n)
    return x, vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), colour, shape


BINDING_NOTE = """
- Auxiliary loss (binding): in the runs with a binding loss weight, every cross-attention layer was
  also supervised with the scenes' exact masks: each caption word of an object (colour, pattern,
  shape) and the background word attend to that object's mask (Break-A-Scene's max-normalised
  MSE), and at each pixel the words of the pixel's own object win the attention among the
  caption's words (-log share; `world_train.BindingStore`). It stands in for what Stable Diffusion
  learns from scale (words bound to their objects), which this small model did not learn from
  captions alone (own-vs-other AUROC 0.49-0.53). It trains the world model only; the concept
  tokens learned later never see it.
"""


def _card_extras(runs: list, model_dir: Path) -> str:
    """The later runs' commands, the binding loss note, and the world gates from world_binding.json."""
    out = ""
    commands = [r["command"] for r in runs if r.get("command")]
    if commands:
        out += "\nLater runs:\n\n" + "\n".join(f"    {c}" for c in commands) + "\n"
    if any(r.get("attn_weight") for r in runs):
        out += BINDING_NOTE
    shares = sorted({r["photo_share"] for r in runs if r.get("photo_share")})
    if shares:
        out += (f"- Caption forms: runs with `--photo-share` ({', '.join(f'{x:g}' for x in shares)}) put that share of "
                "captions in \"a photo of a red circle and a blue square on grass\" or, without the background, "
                "\"a photo of a red circle and a blue square\" (`world_train.CAPTION_FORMS`), the forms the concept "
                "tokens are trained and generated in.\n")
    unnamed_shares = sorted({r["unnamed_share"] for r in runs if r.get("unnamed_share")})
    if unnamed_shares:
        out += (f"- Unnamed objects: runs with `--unnamed-share` ({', '.join(f'{x:g}' for x in unnamed_shares)}) drew "
                "that share of scenes from every shape and left the held-out shapes (star, cross) out of the "
                "caption and the binding loss: the world sees them, never their names, as Stable Diffusion has "
                "seen far more than it can name. For this world the evaluation's held-out shapes are "
                "unnamed, not unseen.\n")
        if any(r.get("unnamed_colour") for r in runs if r.get("unnamed_share")):
            out += ("  Runs with `--unnamed-colour` kept those objects in the caption by colour and pattern, their "
                    "shape unsaid (\"a purple striped and a red circle on grass\"), the colour words bound to them.\n")
        words = sorted({r["unnamed_word"] for r in runs if r.get("unnamed_share") and r.get("unnamed_word")})
        if words:
            out += (f"  Runs with `--unnamed-word` said {', '.join(repr(w) for w in words)} in the place of every "
                    "held-out shape (\"a purple striped the and a red circle on grass\"), one word bound to both, "
                    "as a class noun is to instances Stable Diffusion cannot name.\n")
    if any(r.get("vae_all_shapes") for r in runs):
        out += ("- VAE on every shape: runs with `--vae-all-shapes` trained the VAE on scenes of every shape, star "
                "and cross too (earlier VAE steps saw the named shapes only, and turned stars into crosses); the "
                "denoiser trained after them on the new latents.\n")
    if any(r.get("whole_words") for r in runs):
        out += ("- Tokenizer: since the first run marked `whole_words` in training.json, every world word is one "
                "token (earlier tokenizers split \"green\" in four, shifting the binding loss's word positions "
                "after it); every id is unchanged.\n")
    path = model_dir / "world_binding.json"
    if path.is_file():
        g = json.loads(path.read_text())
        a, tu, rb = g["binding"]["all"], g["text_use"], g.get("readback")
        out += (f"- World gates (`python benchmarks/world_binding.py --model {model_dir.as_posix()} --out "
                f"{(model_dir / 'world_binding.json').as_posix()}`, commit {(g['commit']['head'] if 'commit' in g else g['run']['commit'])[:8]}): own-vs-other AUROC "
                f"of colour / shape words' attention over all layers {a['colour']['mean']:.3f} / "
                f"{a['shape']['mean']:.3f} (t = 100..900; t <= 500: {a['colour']['low_t']:.3f} / "
                f"{a['shape']['low_t']:.3f}); the true caption lowers the fixed-noise loss by "
                f"{tu['drop_upper_half']:.1%} against the empty prompt over t >= 500"
                + (f"; captions read back: colour {rb['colour']:.3f}, shape {rb['shape']:.3f}" if rb else "") + ".\n")
    return out


def write_model_card(model_dir: str | Path, n: int = 8, seed: int = 123, guidance: float = 4.0) -> Path:
    """samples.png (generated images with their captions) and README.md for a trained world model."""
    from PIL import Image, ImageDraw

    from ..generate import generate
    from ..model_io import load_bundle

    model_dir = Path(model_dir)
    bundle = load_bundle(model_dir)
    info = json.loads((model_dir / "training.json").read_text())["stats"]
    captions = [random_scene(seed + i, n_objects=1 + i % 2, shapes=TRAIN_SHAPES).caption for i in range(n)]
    cell, text_h = 128, 30
    grid = Image.new("RGB", (cell * 4, (cell + text_h) * ((n + 3) // 4)), "white")
    draw = ImageDraw.Draw(grid)
    for i, cap in enumerate(captions):
        img = generate(bundle, cap, seed=seed + i, steps=30, guidance=guidance, progress=False)[0]
        x, y = (i % 4) * cell, (i // 4) * (cell + text_h)
        grid.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        words = cap.split(" ")
        mid = len(words) // 2
        draw.text((x + 2, y + cell + 2), " ".join(words[:mid]), fill="black")
        draw.text((x + 2, y + cell + 14), " ".join(words[mid:]), fill="black")
    grid.save(model_dir / "samples.png")
    checker = json.loads((model_dir / "checker.json").read_text()) if (model_dir / "checker.json").is_file() else None
    recon = reconstruction_check(bundle.vae, model_dir)
    p = info["params"]
    runs = info.get("runs", [info])
    how = " then ".join(f"{r['seconds']} s ({r['vae_steps']} VAE + {r['denoiser_steps']} denoiser steps"
                        f"{', warm-started from the previous run' if r.get('warm_start') else ''}"
                        f"{', binding loss weight ' + str(r['attn_weight']) if r.get('attn_weight') else ''})"
                        for r in runs)
    extras = _card_extras(runs, model_dir)
    card = f"""# tiny_world: a small latent diffusion model of Stable Diffusion's classes

Trained by `python -m em_core train-tiny-world --out em_core/tiny_world/model --minutes 45`, then
`... --minutes 45 --vae-share 0.33 --init-from em_core/tiny_world/model`, on {info['threads']} CPU
threads, {info['seconds']} s in all: {how}; seed {info['seed']}. Loads with diffusers'
`StableDiffusionPipeline.from_pretrained(this_folder)` offline.
{extras}
- Data: procedural 64 px scenes of `em_core/tiny_world/scenes.py` drawn on the fly: 1-4 objects (shapes
  circle, square, triangle, diamond; 8 colours; plain, striped or dotted) on grass, sand, water,
  brick or snow, captioned like "a red striped circle and a blue square on grass". The shapes
  star and cross are held out: the model never saw them, so they serve as new concepts to learn.
- Parts: AutoencoderKL ({p['vae']:,} parameters, 64 px -> 16x16x4 latents, scaling factor
  {info['latent_scale']:.4f} set from the latents' spread), UNet2DConditionModel ({p['unet']:,}
  parameters; cross-attention at the 16x16 level and the mid block), CLIPTextModel
  ({p['text_encoder']:,} parameters) with a CLIPTokenizer over the world's words; DDPM schedule of SD 1.x.
- VAE: {info['vae_steps']} steps of batch {info['vae_batch']}, L1 + 1e-6 KL, final loss {info['vae_final_loss']:.4f}.
  {'' if not recon else f"Round trips of 256 fresh single-object renders: L1 {recon['l1']:.3f}; the checker reads colour {recon['colour']:.3f} and shape {recon['shape']:.3f} from them (the ceiling for any image decoded from these latents)."}
- U-Net + text encoder together: {info['denoiser_steps']} steps of batch {info['denoiser_batch']}, epsilon MSE,
  10% captions dropped for classifier-free guidance, final loss (mean of last 100, the binding loss included
  where a run had one) {info['denoiser_final_loss']:.4f};
  the weights saved are an exponential moving average (decay 0.999, diffusers' EMAModel) of the last run.
  Losses of runs on different VAEs are not comparable (a sharper VAE gives latents with more
  detail to predict); what the model can do is measured by `python -m em_core evaluate` and `benchmarks/world_binding.py`.
- `checker.safetensors`: the evaluation's colour / shape reader ({'' if not checker else f"colour accuracy {float(checker['colour']):.3f}, shape accuracy {float(checker['shape']):.3f} on 512 fresh single-object scenes"}).

![samples](samples.png)

Samples above: seeded captions, 30 DDIM steps, guidance {guidance}; each caption under its image.
"""
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    return model_dir / "README.md"
