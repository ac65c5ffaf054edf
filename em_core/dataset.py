"""The training images: decoded, sized for the model, encoded once by the VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .concepts import concept_names
from .images import image_to_tensor, image_to_uint8, open_image, working_size


@dataclass
class TrainImage:
    path: str
    prompt: str
    names: list[str]  # the concepts this image shows, in prompt order
    original_size: tuple[int, int]  # (W, H) of the file
    size: tuple[int, int]  # (W, H) the engine works at
    rgb: np.ndarray  # (H, W, 3) uint8 at working size, for the CRF
    latent_mean: torch.Tensor  # (2 or 1, C, h, w): plain and flipped, already scaled
    latent_std: torch.Tensor

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.latent_mean.shape[-2:])

    def sample_latent(self, flip: bool, generator: torch.Generator) -> torch.Tensor:
        """A (1, C, h, w) draw from the VAE posterior, flipped if asked."""
        i = 1 if flip else 0
        mean, std = self.latent_mean[i], self.latent_std[i]
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + std * eps).unsqueeze(0)


def check_prompts(images: list, prompts: list[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(
            f"prompts: {len(images)} image(s) but {len(prompts)} prompt(s); give exactly one prompt per image"
        )
    for i, p in enumerate(prompts):
        if not concept_names(p):
            raise ValueError(
                f"prompt {i + 1} ({p!r}) names no concept; write the concepts as [v1], [v2], ... "
                "e.g. 'a photo of [v1] and [v2]'"
            )


@torch.no_grad()
def prepare_image(bundle, path: str | Path | None, prompt: str, resolution: int | None = None, flip: bool = True,
                  pil=None) -> TrainImage:
    """Reads `path` (or takes a PIL image `pil`) and encodes it; `resolution` defaults to the model's."""
    img = pil.convert("RGB") if pil is not None else open_image(path, "image")
    resolution = resolution or bundle.default_resolution
    size = working_size(*img.size, resolution, bundle.pixel_granularity)
    pixels = image_to_tensor(img, size).unsqueeze(0)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    vae = bundle.vae
    dist = vae.encode(pixels.to(bundle.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return TrainImage(
        path=str(path) if path is not None else "", prompt=prompt, names=concept_names(prompt),
        original_size=img.size, size=size, rgb=image_to_uint8(img, size),
        latent_mean=dist.mean * scale, latent_std=dist.std * scale,
    )
