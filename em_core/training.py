"""One training step shared by the EM token loop and the joint fine-tune.

Per step: one image, a random non-empty subset of its concepts in random order ("a photo of
[v3] and [v1]", as Break-A-Scene's `random.sample`; or the image prompt's own wording, `step_prompt`), maybe a horizontal flip, a random timestep and noise; loss = masked diffusion loss under the
union of the subset's masks + w * cross-attention loss (Break-A-Scene). Randomness comes from
(seed, step) alone, so a resumed run draws exactly what an unbroken one would.
"""
from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F

from .attention import AttentionCapture, concept_selector
from .concepts import ConceptSet, encode_text, image_sizes, injected, unet_inputs
from .losses import attention_loss, masked_diffusion_loss, outside_loss
from .step_prompt import step_prompt


def step_rng(seed: int, step: int) -> tuple[torch.Generator, random.Random]:
    mixed = (seed * 1_000_003 + step) % (2**63)
    return torch.Generator().manual_seed(mixed), random.Random(mixed)


def diffusion_target(scheduler, latents, noise, t):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"model: prediction type {kind!r} is not supported (epsilon or v_prediction)")


def on_backdrop(z0: torch.Tensor, union: torch.Tensor, backdrops: list, seed: int, step: int) -> torch.Tensor:
    """The latent with everything outside `union` taken from one of `backdrops`, so the concepts
    are seen against other scenes than their own and a fine-tune has less of it to memorise.

    Drawn from its own generator: the step's other draws stay those of a run without backdrops.
    """
    gen, rnd = step_rng(seed + 2_750_159, step)
    back = backdrops[rnd.randrange(len(backdrops))].sample_latent(False, gen).to(z0.device, z0.dtype)
    if back.shape[-2:] != z0.shape[-2:]:
        back = F.interpolate(back, size=z0.shape[-2:], mode="bilinear", align_corners=False)
    u = union.to(z0.dtype)
    return u * z0 + (1 - u) * back


def concept_step_loss(bundle, images, concepts: ConceptSet, vectors: torch.Tensor, latent_masks: list, token_id: dict,
                      step: int, seed: int, flip: bool, attn_weight: float, capture: AttentionCapture,
                      warmup: bool = False, shuffle: bool = True, prompt_form: str = "bas",
                      base_unet=None, outside_weight: float = 0.0, backdrops=None) -> tuple[torch.Tensor, dict]:
    """The loss of step `step` and a record of what it drew.

    `warmup` is plain textual inversion: the image's own prompt, no masks, no attention loss.
    `capture` None: the masked diffusion loss alone, with the U-Net's own (fused) attention.
    `shuffle` False: the drawn concepts keep the image prompt's order (the same draws either way).
    `prompt_form`: the step prompt's wording (`step_prompt`); "image" keeps the image prompt's order.
    `base_unet`, `outside_weight`: a frozen copy of the base U-Net, and the weight of `outside_loss`
    against it (the same noisy latent and text; off when either is missing).
    `backdrops`: images (TrainImage) on which the step's concepts are pasted (`on_backdrop`).
    """
    b = bundle
    gen, rnd = step_rng(seed, step)
    i = rnd.randrange(len(images))
    img = images[i]
    if warmup:
        subset, prompt = img.names, img.prompt
    else:
        k = rnd.randint(1, len(img.names))
        subset = rnd.sample(img.names, k)  # in the order drawn: each step shuffles the prompt, as BaS does
        if not shuffle or prompt_form == "image":
            subset = sorted(subset, key=img.names.index)
        prompt = step_prompt(img.prompt, subset, prompt_form)
    flip = flip and img.latent_mean.shape[0] > 1 and rnd.random() < 0.5
    z0 = img.sample_latent(flip, gen).to(b.device, torch.float32)
    union = None  # warm-up: no masks yet
    if not warmup:
        idx = [img.names.index(n) for n in subset]
        m = latent_masks[i][idx].to(b.device)
        if flip:
            m = m.flip(-1)
        union = m.amax(0, keepdim=True)[None]
        if backdrops:
            z0 = on_backdrop(z0, union, backdrops, seed, step)
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, b.scheduler.config.num_train_timesteps, (1,), generator=gen).to(b.device)
    noisy = b.scheduler.add_noise(z0, noise, t).to(b.dtype)
    target = diffusion_target(b.scheduler, z0, noise, t)
    with injected(b, concepts, vectors):
        cond = encode_text(b, [prompt])
    ids = cond.ids
    info = {"step": step, "phase": "warmup" if warmup else "em", "image": i, "concepts": subset,
            "t": int(t), "flip": bool(flip)}

    def unet():
        return b.unet(noisy, t, **unet_inputs(b, cond, 1, **image_sizes(b, img))).sample

    if warmup or capture is None:  # no attention loss: the U-Net's own (fused) attention
        loss = masked_diffusion_loss(unet(), target, union)
        info.update(loss=loss.item(), mask_loss=loss.item(), attn_loss=0.0)
        return loss, info
    select = concept_selector(ids, [token_id[n] for n in subset])
    if bool((select.sum(1) == 0).any()):
        raise ValueError(f"prompt {prompt!r} lost a concept token to truncation")
    pred, maps = capture.run(select, img.latent_hw, unet)
    lm = masked_diffusion_loss(pred, target, union)
    la = attention_loss(maps, m[None], torch.ones(1, len(idx), dtype=torch.bool, device=maps.device))
    loss = lm + attn_weight * la
    info.update(loss=loss.item(), mask_loss=lm.item(), attn_loss=la.item())
    if base_unet is not None and outside_weight > 0:
        with torch.no_grad():
            base_pred = base_unet(noisy, t, **unet_inputs(b, cond.detached(), 1, **image_sizes(b, img))).sample
        lo = outside_loss(pred, base_pred, union)
        loss = loss + outside_weight * lo
        info.update(loss=loss.item(), outside_loss=lo.item())
    return loss, info


class SaveInterrupted(KeyboardInterrupt):
    """A second Ctrl-C stopped the save at exit: the run folder holds what its last completed save
    wrote, which may be an older step than the one the run had reached."""


@contextlib.contextmanager
def saved_on_exit(save, on_interrupt):
    """Saves once when the block ends; on Ctrl-C marks the state first, saves, and re-raises
    (a `SaveInterrupted` if another Ctrl-C stopped that save)."""
    try:
        yield
    except KeyboardInterrupt:
        on_interrupt()
        try:
            save()
        except KeyboardInterrupt as again:
            raise SaveInterrupted("a second Ctrl-C stopped the save at exit") from again
        raise
    save()


def interrupted_message(exc: BaseException, out, finetune: bool = False) -> str:
    """What to print after a Ctrl-C: the step the run folder really holds, read back from its
    commit file (the in-memory step is not it when the save at exit was cut short)."""
    from .state import saved_progress

    saved = saved_progress(out)
    if saved is None:
        held = f"{out} holds no readable run state"
    elif finetune and saved["finetune_step"] is None:
        held = f"{out} holds no fine-tune step yet (the learned state, step {saved['step']})"
    elif finetune:
        held = f"{out} holds fine-tune step {saved['finetune_step']}"
    else:
        held = f"{out} holds step {saved['step']}"
    if isinstance(exc, SaveInterrupted):
        return (f"interrupted again during the save at exit, which did not finish: {held}, from its last "
                f"completed save; later steps are lost. Run the same command to "
                f"{'continue' if finetune else 'resume'} from there")
    return f"interrupted: {held}; run the same command to {'continue' if finetune else 'resume'}"
