"""Loading a model bundle offline: a diffusers-format folder here, a single-file checkpoint in
single_file.py."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .bundle import ModelBundle
from .single_file import load_single_file


def load_bundle(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                prediction_type: str | None = None) -> ModelBundle:
    """Loads a diffusers-format folder (model_index.json + component subfolders), or a single-file
    SD 1.x / 2.x .safetensors checkpoint, with no network. `prediction_type` (epsilon or
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
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"model: {path} lacks the subfolder(s) {', '.join(missing)} of a diffusers-format model")
    kw = dict(local_files_only=True)
    wkw = dict(use_safetensors=True, torch_dtype=dtype, **kw)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **wkw)
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
    bundle = ModelBundle((tokenizer,), (text_encoder,), unet, vae, scheduler, source=str(path.resolve()))
    return bundle.to(device=device).freeze()
