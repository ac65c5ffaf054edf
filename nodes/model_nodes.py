"""Nodes that make the engine's model: from ComfyUI's own MODEL / CLIP / VAE, or from a folder."""
from __future__ import annotations

from pathlib import Path

import torch

from em_core.model import load_bundle
from em_core.single_file import bundle_from_comfy

from . import host

CATEGORY = "concept_em"
MODEL = "CONCEPT_EM_MODEL"
SHIPPED = "tiny_world (shipped)"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "em_core" / "models" / "tiny_world"
DIFFUSERS_FALLBACK = Path("models") / "diffusers"  # outside ComfyUI


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def comfy_state_dicts(model, clip, vae) -> tuple[dict, dict, dict, str | None]:
    """The state dicts of ComfyUI's MODEL, CLIP and VAE objects, and the model's prediction type."""
    try:
        unet = model.model.diffusion_model.state_dict()
        text = clip.cond_stage_model.state_dict()
        first_stage = vae.first_stage_model.state_dict()
    except AttributeError as exc:
        raise ValueError("model / clip / vae: expected what the core Load Checkpoint node gives") from exc
    kind = getattr(getattr(model.model, "model_type", None), "name", "EPS")
    prediction = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}.get(kind)
    if prediction is None:
        raise ValueError(f"model: prediction type {kind} is not supported (epsilon or v-prediction SD 1.x / 2.x)")
    return unet, text, first_stage, prediction


class ConceptModelFromCheckpoint:
    """The engine's model from what Load Checkpoint gives (SD 1.x / 2.x), converted offline."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",)}}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("em_model",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @host.trains
    def run(self, model, clip, vae):
        unet, text, first_stage, prediction = comfy_state_dicts(model, clip, vae)
        bundle = bundle_from_comfy(unet, text, first_stage, prediction, source="comfyui:checkpoint")
        return (bundle.to(device=_device()),)


class ConceptModelLoader:
    """A diffusers-format model folder (models/diffusers/...) or the shipped tiny-world model."""

    @classmethod
    def INPUT_TYPES(cls):
        choices = [SHIPPED] + host.list_diffusers(DIFFUSERS_FALLBACK)
        return {"required": {"model_name": (choices, {"default": SHIPPED})}}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("em_model",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @host.trains
    def run(self, model_name):
        if model_name == SHIPPED:
            path = SHIPPED_DIR
        else:
            path = host.find_diffusers(model_name, DIFFUSERS_FALLBACK)
        return (load_bundle(path, device=_device()),)
