"""Prior preservation for the joint fine-tune (Break-A-Scene stage 2, DreamBooth's class prior).

The weights being tuned also learn to keep what the base model made of a class prompt: images
the base model generated from it are denoised beside the concept images, with their own plain
diffusion loss times a weight (BaS: `--class_prompt "a photo at the beach"`, 100 images,
`--prior_loss_weight 1.0`). The images are made once, before any weight moves, and kept in the
run folder (`class_images/`), so a resumed fine-tune reads the same ones back.
"""
from __future__ import annotations

import warnings

import torch
from PIL import Image

from .atomic import inside, write_atomic
from .concepts import CONCEPT_RE, encode_text, image_sizes, unet_inputs
from .dataset import TrainImage, prepare_image
from .losses import masked_diffusion_loss
from .training import diffusion_target, step_rng

FOLDER = "class_images"
SEED = 7_919  # the class images' seeds: SEED + i, apart from every other draw of a run


def check_class_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise ValueError("class_prompt: empty; give what the base model should keep making, e.g. 'a photo at the beach'")
    if CONCEPT_RE.search(prompt):
        raise ValueError(f"class_prompt: {prompt!r} names a concept; it is the base model's prior, so it must be "
                         "plain words (e.g. 'a photo at the beach')")


def class_images(bundle, prompt: str, n: int, out=None, *, steps: int = 50, guidance: float = 7.5,
                 should_stop=None, progress: bool = True) -> list[Image.Image]:
    """n images the base model makes from `prompt` (seeds SEED..SEED+n-1), read back from
    `out/class_images/` where an earlier run left them, the rest generated and saved one by one.

    Call it before the fine-tune applies any weights: these images are the base model's prior.
    Returns fewer than n only when `should_stop()` asked to stop.
    """
    from .generate import generate

    check_class_prompt(prompt)
    folder = inside(out, FOLDER) if out is not None else None
    images = []
    for i in range(n):
        path = folder / f"class_{i:04d}.png" if folder is not None else None
        if path is not None and path.is_file():
            try:
                with Image.open(path) as f:
                    images.append(f.convert("RGB"))
                continue
            except OSError:
                warnings.warn(f"{path}: unreadable, made again", stacklevel=2)
        if should_stop is not None and should_stop():
            break
        img = generate(bundle, prompt, seed=SEED + i, steps=steps, guidance=guidance, progress=False)[0]
        if path is not None:
            write_atomic(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        images.append(img)
        if progress:
            print(f"class image {i + 1}/{n}", flush=True)
    return images


def prepare_class_images(bundle, images: list[Image.Image], prompt: str) -> list[TrainImage]:
    """Encoded once by the VAE, as the concept images are; never flipped (BaS flips instances only)."""
    return [prepare_image(bundle, None, prompt, pil=img, flip=False) for img in images]


def prior_loss(bundle, images: list[TrainImage], prompt: str, step: int, seed: int) -> torch.Tensor:
    """Plain diffusion loss of step `step`'s class image (they take turns), its own draws from (seed, step)."""
    b = bundle
    gen, _ = step_rng(seed, step)
    img = images[step % len(images)]
    z0 = img.sample_latent(False, gen).to(b.device, torch.float32)
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, b.scheduler.config.num_train_timesteps, (1,), generator=gen).to(b.device)
    noisy = b.scheduler.add_noise(z0, noise, t).to(b.dtype)
    cond = encode_text(b, [prompt])
    pred = b.unet(noisy, t, **unet_inputs(b, cond, 1, **image_sizes(b, img))).sample
    return masked_diffusion_loss(pred, diffusion_target(b.scheduler, z0, noise, t), None)
