"""The model bundle: the five parts of a Stable Diffusion family model the engine needs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def load_bundle(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                prediction_type: str | None = None) -> ModelBundle:
    """Loads a diffusers-format folder (model_index.json + component subfolders; SDXL when it has
    text_encoder_2), or a single-file SD 1.x / 2.x .safetensors checkpoint, with no network. `prediction_type` (epsilon or
    v_prediction) is for single files, where SD 2.x needs it; a folder's scheduler states its own,
    and a different one given is refused."""
    path = Path(path)
    if path.is_file():
        from .single_file import load_single_file

        return load_single_file(path, prediction_type=prediction_type, device=device, dtype=dtype)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model: {path} does not exist; give a diffusers-format model folder (one with model_index.json) "
            "or a .safetensors checkpoint, or make one with `python -m em_core make-tiny-model DIR`"
        )
    xl = (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir()
    need = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if xl else ())
    missing = [sub for sub in need if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"model: {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers-format model")
    kw = dict(local_files_only=True)
    wkw = dict(use_safetensors=True, torch_dtype=dtype, **kw)
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)]
        text_encoders = [CLIPTextModel.from_pretrained(path / "text_encoder", **wkw)]
        if xl:
            tokenizers.append(CLIPTokenizer.from_pretrained(path / "tokenizer_2", **kw))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **wkw))
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **wkw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **wkw)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", **kw)
    except (OSError, EnvironmentError) as exc:
        raise FileNotFoundError(
            f"model: {path} could not be read offline ({exc}). Weights must be .safetensors files "
            "(pickled .bin weights are never loaded); re-save the model with safe_serialization=True"
        ) from exc
    own = scheduler.config.prediction_type
    if prediction_type is not None and prediction_type != own:
        raise ValueError(f"prediction_type: {path} is a diffusers folder whose scheduler predicts {own}; "
                         f"{prediction_type} is for single files only (drop it)")
    if xl and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ValueError(f"model: {path} has a text_encoder_2 but its U-Net is not SDXL's (addition_embed_type "
                         f"{unet.config.addition_embed_type!r}, expected 'text_time')")
    if not xl and getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise ValueError(f"model: {path}'s U-Net is SDXL's (addition_embed_type 'text_time') but the folder has "
                         "no text_encoder_2 / tokenizer_2; an SDXL refiner or a partial copy is not supported")
    bundle = ModelBundle(tuple(tokenizers), tuple(text_encoders), unet, vae, scheduler, source=str(path.resolve()))
    return bundle.to(device=device).freeze()
