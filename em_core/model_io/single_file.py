"""Loading a single-file SD 1.x / 2.x / XL checkpoint (.safetensors in the original LDM layout, as
ComfyUI and A1111 use) into the engine's bundle, offline, with the configs and CLIP tokenizer
files the project ships. Conversion is diffusers' own (loaders.single_file_utils).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..integrity import read_failure
from .bundle import ModelBundle
from .clip_files import clip_tokenizer_from_files
from .sd_configs import CLIP_TOKENIZER, SD2_HELP, check_prediction_type, detect_family, family_config

# ComfyUI's Checkpoint Save marks a v-prediction model with this (empty) tensor; A1111 and the
# original Stability releases write nothing.
V_PRED_MARKER = "v_pred"


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return clip_tokenizer_from_files(CLIP_TOKENIZER / "vocab.json", CLIP_TOKENIZER / "merges.txt",
                                     pad_token=pad_token, model_max_length=77)


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    own = module.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 has no text_model level
        state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"checkpoint: the {what} lacks {len(missing)} weight(s), e.g. {missing[:3]}")
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            if own[k].numel() == v.numel():  # LDM's 1x1 conv vs diffusers' linear attention projections
                state[k] = v.reshape(own[k].shape)
            else:
                raise ValueError(f"checkpoint: {what} weight {k} has shape {tuple(v.shape)}, "
                                 f"expected {tuple(own[k].shape)}; is this the right model family?")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def prediction_type_of(family: str, keys, given: str | None = None, where: str = "checkpoint") -> str:
    """What a single file's U-Net predicts: `given` when set; epsilon for SD 1.x; for SD 2.x only
    what the file says (ComfyUI's v_pred marker), else an error asking for it. SD 2.x-base (512 px,
    epsilon) and SD 2.x 768-v (768 px, v-prediction) have the same weight names and shapes, so
    guessing would train half of them on the wrong target."""
    if given is not None:
        return check_prediction_type(given)
    if family == "sdxl":  # SDXL base is epsilon; v-prediction fine-tunes carry ComfyUI's marker
        return "v_prediction" if V_PRED_MARKER in keys else "epsilon"
    if family != "sd2":
        return "epsilon"
    if V_PRED_MARKER in keys:
        return "v_prediction"
    raise ValueError(f"{where}: this SD 2.x file does not say whether it predicts epsilon or v; give it: "
                     f"--prediction-type epsilon or v_prediction on the command line, or the checkpoint node's "
                     f"prediction_type input ({SD2_HELP})")


def state_dict_to_bundle(checkpoint: dict, family: str | None = None, prediction_type: str | None = None,
                         source: str = "") -> ModelBundle:
    """A bundle from an LDM-layout state dict (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*).
    SD 2.x needs `prediction_type` unless the file marks it (see prediction_type_of)."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    family = family or detect_family(checkpoint)
    prediction_type = prediction_type_of(family, checkpoint, prediction_type, source or "checkpoint")
    extra = {}
    if family == "sd2":
        text_state = lambda text: convert_open_clip_checkpoint(text, checkpoint)  # noqa: E731
    else:
        text_state = lambda text: convert_ldm_clip_checkpoint(checkpoint)  # noqa: E731
    if family == "sdxl":  # CLIP-L under conditioner.embedders.0.transformer., bigG under .1.model.
        extra["text_state_2"] = lambda text: convert_open_clip_checkpoint(
            text, checkpoint, prefix="conditioner.embedders.1.model.")
    return _assemble(family, lambda cfg: convert_ldm_unet_checkpoint(checkpoint, cfg),
                     lambda cfg: convert_ldm_vae_checkpoint(checkpoint, cfg), text_state, prediction_type,
                     source or f"state-dict:{family}", **extra)


def bundle_from_comfy(unet_state: dict, clip_state: dict, vae_state: dict, prediction_type: str | None = None,
                      source: str = "comfyui", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A bundle from the state dicts of ComfyUI's MODEL (diffusion_model: LDM names), CLIP
    (clip_l.transformer.* for SD 1.x, clip_h.transformer.* for SD 2.x, both clip_l.* and clip_g.* for
    SDXL: Hugging Face names already, clip_g's projection already a Linear weight)
    and VAE (LDM names), with `prediction_type` as ComfyUI's model says (needed for SD 2.x). Tensors
    are copied once into the engine's modules, which hold them in `dtype`."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from .ldm_layout import UNET_PREFIX, VAE_PREFIX

    prefixes = {"clip_l.transformer.": "sd15", "clip_h.transformer.": "sd2", "clip_g.transformer.": "sdxl"}
    found = [p for p in prefixes if any(k.startswith(p) for k in clip_state)]
    if sorted(found) == ["clip_g.transformer.", "clip_l.transformer."]:  # SDXL: both, HF names already
        found = ["clip_l.transformer.", "clip_g.transformer."]
        family = "sdxl"
    elif len(found) == 1 and found[0] != "clip_g.transformer.":
        family = prefixes[found[0]]
    else:
        raise ValueError("clip: expected the CLIP of an SD 1.x (clip_l.*), SD 2.x (clip_h.*) or SDXL (clip_l.* and "
                         "clip_g.*) checkpoint; other families are not supported")
    unet_ldm = {UNET_PREFIX + k: v for k, v in unet_state.items()}
    vae_ldm = {VAE_PREFIX + k: v for k, v in vae_state.items()}
    texts = [{k[len(p):]: v for k, v in clip_state.items() if k.startswith(p)} for p in found]
    prediction_type = prediction_type_of(family, (), prediction_type, "model")
    return _assemble(family, lambda cfg: convert_ldm_unet_checkpoint(unet_ldm, cfg),
                     lambda cfg: convert_ldm_vae_checkpoint(vae_ldm, cfg), lambda model: texts[0], prediction_type,
                     source, dtype, **({"text_state_2": lambda model: texts[1]} if family == "sdxl" else {}))


def _assemble(family, unet_state, vae_state, text_state, prediction_type, source,
              dtype: torch.dtype = torch.float32, text_state_2=None) -> ModelBundle:
    from diffusers.models.modeling_utils import no_init_weights

    cfg = family_config(family, prediction_type)
    # Each module goes to `dtype` before its weights are copied in, so a half-precision model never
    # has a float32 copy of all its weights at once. Modules are built without random init (as
    # diffusers' from_pretrained does): every weight is overwritten, and _load_strict refuses a state
    # that lacks one; SD 1.5's random init alone took 13 s on 2 CPU cores.
    with no_init_weights():
        unet = UNet2DConditionModel(**cfg["unet"]).to(dtype)
        _load_strict(unet, unet_state(dict(unet.config)), "U-Net")
        vae = AutoencoderKL(**cfg["vae"]).to(dtype)
        _load_strict(vae, vae_state(dict(vae.config)), "VAE")
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"])).to(dtype)
        _load_strict(text, text_state(text), "text encoder")
        tokenizers, encoders = [clip_tokenizer(cfg["pad_token"])], [text]
        if "text_2" in cfg:  # SDXL: OpenCLIP ViT-bigG with its projection
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])).to(dtype)
            _load_strict(text_2, text_state_2(text_2), "second text encoder")
            tokenizers.append(clip_tokenizer(cfg["pad_token_2"]))
            encoders.append(text_2)
    bundle = ModelBundle(tuple(tokenizers), tuple(encoders), unet, vae, DDPMScheduler(**cfg["scheduler"]),
                         source=source)
    return bundle.freeze()


def load_single_file(path: str | Path, family: str | None = None, prediction_type: str | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A bundle from one .safetensors checkpoint; pickled .ckpt files are refused, never opened.
    SD 1.x files are epsilon; an SD 2.x file needs `prediction_type` unless it carries ComfyUI's
    v_pred marker (the error says which value each SD 2.x release needs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist or is not a file")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"checkpoint: {path.name} is not .safetensors; pickled checkpoints (.ckpt, .pt, .bin) "
                         "are never loaded. Convert it to safetensors first")
    try:
        with safe_open(str(path), framework="pt") as f:  # names only: the family and type are checked first
            keys = set(f.keys())
        family = family or detect_family(keys)
        prediction_type = prediction_type_of(family, keys, prediction_type, f"checkpoint {path.name}")
        checkpoint = load_file(str(path))
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors, the system's: each named for what it is
        raise read_failure("checkpoint", path, exc, "download or convert it again") from exc
    bundle = state_dict_to_bundle(checkpoint, family, prediction_type, source=str(path.resolve()))
    del checkpoint
    return bundle.to(device=device, dtype=dtype)
