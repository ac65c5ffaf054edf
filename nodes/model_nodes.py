"""Nodes that make the engine's model: from ComfyUI's own MODEL / CLIP / VAE, or from a folder."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from em_core.model_io import load_bundle
from em_core.model_io.single_file import bundle_from_comfy
from em_core.precision import compute_dtype
from em_core.tiny_world import SHIPPED_MODEL

from . import host
from .constants import CATEGORY, MODEL

SHIPPED = "tiny_world (shipped)"
SHIPPED_DIR = SHIPPED_MODEL
DIFFUSERS_FALLBACK = Path("models") / "diffusers"  # outside ComfyUI


FROM_MODEL = "from model"
PREDICTIONS = [FROM_MODEL, "epsilon", "v_prediction"]


def comfy_state_dicts(model, clip, vae) -> tuple[dict, dict, dict, str | None]:
    """The state dicts of ComfyUI's MODEL, CLIP and VAE objects, and the model's prediction type
    (ComfyUI's model.model.model_type: ModelType.EPS or V_PREDICTION, which it read from the file)."""
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


def loaded_dtype(model, unet_state: dict, device) -> torch.dtype:
    """The precision the user loaded the model in, as the engine's modules will hold it: the dtype
    ComfyUI computes the U-Net in (its manual cast dtype where it stores weights in another, e.g.
    fp8), else the weights' own. On the CPU float32, as ComfyUI's --cpu runs (half precision there
    is slow and lacks kernels); bf16 on a GPU without it falls back to fp16."""
    if torch.device(device).type == "cpu":
        return torch.float32
    dtype = getattr(getattr(model, "model", None), "manual_cast_dtype", None)
    if dtype is None:
        kinds = Counter(v.dtype for v in unet_state.values() if torch.is_tensor(v) and v.is_floating_point())
        dtype = kinds.most_common(1)[0][0] if kinds else torch.float32
    return compute_dtype(dtype, device)


def _bytes(states, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() for sd in states for v in sd.values() if torch.is_tensor(v)) * size


class ConceptModelFromCheckpoint:
    """The engine's model from what Load Checkpoint gives (SD 1.x / 2.x), converted offline."""

    DESCRIPTION = ("Turns what Load Checkpoint gives (MODEL, CLIP, VAE of an SD 1.x or 2.x checkpoint) into the "
                   "model the Concept EM nodes learn with. ComfyUI's own models are left as they are; the copy "
                   "keeps the precision they were loaded in and lives on ComfyUI's device.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the MODEL output of Load Checkpoint"}),
            "clip": ("CLIP", {"tooltip": "the CLIP output of the same Load Checkpoint"}),
            "vae": ("VAE", {"tooltip": "the VAE output of the same Load Checkpoint"}),
            # Last, so a workflow saved before it existed keeps its links and values.
            "prediction_type": (PREDICTIONS, {"default": FROM_MODEL, "tooltip": (
                "what the U-Net predicts. 'from model': what ComfyUI read from the file (SD 1.x: epsilon). "
                "ComfyUI guesses it for SD 2.x files; if it guessed wrong, set it: SD 2.1-base / 2.0-base is "
                "epsilon (512 px), SD 2.1 / 2.0 (768-v) is v_prediction (768 px)")}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("em_model",)
    OUTPUT_TOOLTIPS = ("the model for Attention Mask Init, EM Token Step, Joint Finetune, Concept Generate",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @host.trains
    def run(self, model, clip, vae, prediction_type=FROM_MODEL):
        device = host.torch_device()
        unet, text, first_stage, prediction = comfy_state_dicts(model, clip, vae)
        dtype = loaded_dtype(model, unet, device)
        needed = _bytes((unet, text, first_stage), dtype)
        del unet, text, first_stage  # taken again once ComfyUI has made room, so no tensor pins its GPU copy
        host.free_memory(needed, device)
        unet, text, first_stage, _ = comfy_state_dicts(model, clip, vae)
        if prediction_type != FROM_MODEL:
            prediction = prediction_type
        try:
            bundle = bundle_from_comfy(unet, text, first_stage, prediction, source="comfyui:checkpoint", dtype=dtype)
            del unet, text, first_stage
            return (bundle.to(device=device),)
        finally:
            host.soft_empty_cache()


class ConceptModelLoader:
    """A diffusers-format model folder (models/diffusers/...) or the shipped tiny-world model."""

    DESCRIPTION = ("Loads a model for the Concept EM nodes: the small tiny-world model shipped with the pack (runs "
                   "in minutes on a CPU), or a diffusers-format folder (one with a model_index.json) under "
                   "ComfyUI's models/diffusers.")

    @classmethod
    def INPUT_TYPES(cls):
        choices = [SHIPPED] + host.list_diffusers(DIFFUSERS_FALLBACK)
        return {"required": {"model_name": (choices, {"default": SHIPPED, "tooltip": (
            "tiny_world (shipped): the pack's own 64 px model of coloured shapes, for trying the nodes; "
            "the others: diffusers folders found under models/diffusers")})}}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("em_model",)
    OUTPUT_TOOLTIPS = ("the model for Attention Mask Init, EM Token Step, Joint Finetune, Concept Generate",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @host.trains
    def run(self, model_name):
        if model_name == SHIPPED:
            path = SHIPPED_DIR
        else:
            path = host.find_diffusers(model_name, DIFFUSERS_FALLBACK)
        device = host.torch_device()
        bundle = load_bundle(path)  # on the CPU first: ComfyUI makes room for it before it moves
        host.free_memory(sum(p.numel() * p.element_size() for m in (bundle.unet, bundle.vae, *bundle.text_encoders)
                             for p in m.parameters()), device)
        try:
            return (bundle.to(device=device),)
        finally:
            host.soft_empty_cache()
