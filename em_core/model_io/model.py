"""Loading a model bundle offline: a diffusers-format folder here, a single-file checkpoint in
single_file.py."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .bundle import FAMILY_NAMES, TEXT_ENCODER_NAMES, ModelBundle  # noqa: F401 (FAMILY_NAMES, TEXT_ENCODER_NAMES: re-exported)
from .clip_files import load_clip_tokenizer
from .single_file import load_single_file


def load_bundle(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                prediction_type: str | None = None) -> ModelBundle:
    """Loads a diffusers-format folder (model_index.json + component subfolders; SDXL when it has
    text_encoder_2), or a single-file SD 1.x / 2.x .safetensors checkpoint, with no network. `prediction_type` (epsilon or
    v_prediction) is for single files, where SD 2.x needs it; a folder's scheduler states its own,
    and a different one given is refused."""
    path = Path(path)
    if path.is_file():
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
        tokenizers = [load_clip_tokenizer(path / "tokenizer")]
        text_encoders = [CLIPTextModel.from_pretrained(path / "text_encoder", **wkw)]
        if xl:
            tokenizers.append(load_clip_tokenizer(path / "tokenizer_2"))
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
