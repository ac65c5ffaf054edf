"""The configs of the SD families a single-file checkpoint can be: shipped, so loading is offline.

Only the settings that differ from the diffusers / transformers defaults are written out.
"""
from __future__ import annotations

from pathlib import Path

CLIP_TOKENIZER = Path(__file__).parent / "configs" / "clip_tokenizer"

_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# The noise schedule Stable Diffusion 1.x / 2.x-base were trained with.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)

FAMILIES = {
    # Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 512 px.
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        vae=_VAE,
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        scheduler=SD_SCHEDULER, pad_token="<|endoftext|>",
    ),
    # Stable Diffusion 2.x: OpenCLIP ViT-H/14 (penultimate layer, so 23 layers). Two kinds share these
    # weights' shapes: SD 2.x-base, 512 px epsilon, and SD 2.x (768-v), 768 px v-prediction; a single
    # file rarely says which, so family_config takes the prediction type and sets the side from it.
    # The entries here are the 768-v model's.
    "sd2": dict(
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True, upcast_attention=True),
        vae=_VAE,
        text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        scheduler=dict(SD_SCHEDULER, prediction_type="v_prediction"),
        pad_token="!",
    ),
    # Stable Diffusion XL base 1.0: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with its projection, the
    # pooled text), both read at their penultimate layer; a text_time U-Net with no cross-attention at
    # its finest level; 1024 px; epsilon.
    "sdxl": dict(
        unet=dict(sample_size=128, layers_per_block=2, block_out_channels=[320, 640, 1280],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        text_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        scheduler=SD_SCHEDULER, pad_token="<|endoftext|>", pad_token_2="!",
    ),
}
# The token ids and table size a text config carries beside its shapes.
TEXT_IDS = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


PREDICTION_TYPES = ("epsilon", "v_prediction")
# The native side of each SD 2.x kind: SD 2.x-base is 512 px epsilon, SD 2.x (768-v) 768 px v-prediction.
SD2_SIDES = {"epsilon": 512, "v_prediction": 768}
SD2_HELP = ("SD 2.1-base (and 2.0-base) is epsilon at 512 px, SD 2.1 (and 2.0, the 768-v models) is "
            "v_prediction at 768 px")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def family_config(family: str, prediction_type: str | None = None) -> dict:
    """The configs of `family` for a model trained on `prediction_type`: the scheduler's target and,
    for SD 2.x, the U-Net's native side (64 latents for base/epsilon, 96 for 768-v). SD 1.x is
    epsilon unless told otherwise; SD 2.x needs the type (see single_file.prediction_type_of)."""
    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; choose one of {sorted(FAMILIES)}")
    cfg = FAMILIES[family]
    if prediction_type is None:
        if family == "sd2":
            raise ValueError(f"prediction_type: an SD 2.x model needs it ({SD2_HELP})")
        return cfg
    check_prediction_type(prediction_type)
    out = dict(cfg, scheduler=dict(cfg["scheduler"], prediction_type=prediction_type))
    if family == "sd2":
        out["unet"] = dict(cfg["unet"], sample_size=SD2_SIDES[prediction_type] // 8)
    return out


def detect_family(keys) -> str:
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys) and any(
            k.startswith("conditioner.embedders.0.transformer.") for k in keys):
        return "sdxl"
    if "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError("checkpoint: this looks like an SDXL refiner (one OpenCLIP text encoder), which is not "
                         "supported; SDXL base checkpoints are")
    raise ValueError("checkpoint: no SD 1.x / 2.x text encoder keys (cond_stage_model.*) found; "
                     "is this a full Stable Diffusion checkpoint?")
