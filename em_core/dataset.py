"""The training images: decoded, sized for the model, encoded once by the VAE."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .concepts import CONCEPT_RE, check_name, concept_names
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


def short(text: str, limit: int = 60) -> str:
    """`text` quoted for a message, cut to about `limit` characters (a prompt may be 10,000)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def check_prompts(images: list, prompts: list[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(
            f"prompts: {len(images)} image(s) but {len(prompts)} prompt(s); give exactly one prompt per image"
        )
    for i, p in enumerate(prompts):
        if not concept_names(p):
            raise ValueError(
                f"prompt {i + 1} ({short(p)}) names no concept; write the concepts as [v1], [v2], ... "
                "e.g. 'a photo of [v1] and [v2]'"
            )
        for name in concept_names(p):
            try:
                check_name(name)
            except ValueError as exc:
                raise ValueError(f"prompt {i + 1}: {exc}") from None


def check_prompt_length(tokenizer, prompt: str, what: str = "prompt", encoder: str = "the text encoder") -> None:
    """Refuses a prompt longer than the text encoder reads (the tokenizer's model_max_length, with
    its start and end tokens): the tail would be cut off silently, and with it any concept there."""
    limit = tokenizer.model_max_length - 2
    parts = CONCEPT_RE.split(prompt)  # text, N, text, N, ..., text; each [vN] is one token
    count, lost = 0, []
    for j, part in enumerate(parts):
        if j % 2:
            if count >= limit:
                lost.append(f"[v{part}]")
            count += 1
        elif part.strip():
            count += len(tokenizer(part.strip(), add_special_tokens=False).input_ids)
    if count > limit:
        fell = (f"{', '.join(dict.fromkeys(lost))} would fall off its end" if lost
                else "its end would be cut off")
        raise ValueError(f"{what} ({short(prompt)}) is {count:,} tokens long, but {encoder} reads "
                         f"{limit}; {fell}. Shorten it")


ENCODER_NAMES = ("text encoder 1 (CLIP ViT-L)", "text encoder 2 (OpenCLIP ViT-bigG)")


def check_bundle_prompt(bundle, prompt: str, what: str = "prompt") -> None:
    """check_prompt_length for each of the model's tokenizers (SDXL has two; either may cut a concept off)."""
    tokenizers = bundle.tokenizers
    for j, tok in enumerate(tokenizers):
        check_prompt_length(tok, prompt, what, ENCODER_NAMES[j] if len(tokenizers) > 1 else "the text encoder")


@torch.no_grad()
def prepare_image(bundle, path: str | Path | None, prompt: str, resolution: int | None = None, flip: bool = True,
                  pil=None) -> TrainImage:
    """Reads `path` (or takes a PIL image `pil`) and encodes it; `resolution` defaults to the model's."""
    check_bundle_prompt(bundle, prompt, f"prompt of {Path(path).name if path is not None else 'the image'}")
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
