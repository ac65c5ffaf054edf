"""The model bundle: the five parts of a Stable Diffusion family model the engine needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

# The component names of a model's text encoders, in the bundle's order (SDXL has two).
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x / 2.x (one text encoder)",
                "sdxl": "Stable Diffusion XL (two text encoders)"}


@dataclass
class ModelBundle:
    """Tokenizer, text encoder, U-Net, VAE and training scheduler of one SD-family model.

    Text encoders are a tuple: SD 1.x / 2.x have one, SDXL two (CLIP ViT-L and OpenCLIP ViT-bigG
    with its projection), each with its own tokenizer.
    """

    tokenizers: tuple
    text_encoders: tuple
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    source: str = ""

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.text_encoders[0]

    @property
    def is_xl(self) -> bool:
        """SDXL: two text encoders, and a U-Net conditioned on the pooled text and the time ids."""
        return len(self.text_encoders) == 2

    @property
    def family(self) -> str:
        """'sdxl' or 'sd' (SD 1.x and 2.x: one text encoder, cross-attention on its hidden states)."""
        return "sdxl" if self.is_xl else "sd"

    def text_modules(self) -> dict:
        """{'text_encoder': ..., ['text_encoder_2': ...]}: the component names weights are kept under."""
        return dict(zip(TEXT_ENCODER_NAMES, self.text_encoders))

    # From the first parameter: diffusers' own `.device`/`.dtype` walk every module looking for
    # offloading hooks, which cost about a millisecond a call, 9% of a tiny-world token step.
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_granularity(self) -> int:
        """Latent sides must be multiples of this so every U-Net downsample divides evenly."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def pixel_granularity(self) -> int:
        return self.vae_scale_factor * self.unet_granularity

    @property
    def default_resolution(self) -> int:
        """The side the model was trained at (512 for SD 1.5, 768 for SD 2 v-models)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor

    def to(self, device=None, dtype=None) -> "ModelBundle":
        for module in (*self.text_encoders, self.unet, self.vae):
            if (device is not None and torch.device(device) != module.device) or (dtype not in (None, module.dtype)):
                module.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "ModelBundle":
        """Token learning never updates model weights; say so to autograd."""
        for module in (*self.text_encoders, self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()
        return self
