"""The held-out loss: the denoising loss of each image under its own prompt on noise and
timesteps fixed once for the run, so two points of its curve differ only by what was learned
(the training loss draws a new image, subset, timestep and noise every step)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .concepts import ConceptSet, encode_text, image_sizes, injected, unet_inputs
from .masks import draw_timesteps
from .training import diffusion_target


@torch.no_grad()
def fixed_noise_loss(bundle, images, concepts: ConceptSet, n_timesteps: int = 8, seed: int = 0) -> float:
    """Mean over the images and `n_timesteps` stratified timesteps (seeded, the same every call)."""
    b = bundle
    total = 0.0
    for i, img in enumerate(images):
        gen = torch.Generator().manual_seed(seed * 7_919 + i)
        t = draw_timesteps(n_timesteps, b.scheduler.config.num_train_timesteps, gen).to(b.device)
        z0 = img.latent_mean[0:1].to(b.device, torch.float32).expand(n_timesteps, -1, -1, -1)
        noise = torch.randn(z0.shape, generator=gen).to(b.device)
        with injected(b, concepts):
            cond = encode_text(b, [img.prompt])
        noisy = b.scheduler.add_noise(z0, noise, t).to(b.dtype)
        pred = b.unet(noisy, t, **unet_inputs(b, cond, n_timesteps, **image_sizes(b, img))).sample
        total += float(F.mse_loss(pred.float(), diffusion_target(b.scheduler, z0, noise, t).float()))
    return total / len(images)
