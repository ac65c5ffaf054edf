"""Small random models of the real SD classes, for tests and the offline demo."""
from __future__ import annotations

from pathlib import Path

import torch
import json

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..model_io import ModelBundle
from ..model_io.clip_files import clip_tokenizer_from_files, save_clip_tokenizer
from ..model_io.sd_configs import FAMILIES, SD_SCHEDULER, TEXT_IDS
from .tokenizer_build import save_tokenizer

TINY = dict(
    unet=dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ),
    vae=dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=64,
    ),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
)

# Stable Diffusion 1.5's shapes and layer names (the single-file loader's config), random weights.
# build_model gives the text encoder its vocabulary size and special tokens from the tokenizer.
SD15 = dict(
    unet=FAMILIES["sd15"]["unet"], vae=FAMILIES["sd15"]["vae"],
    text={k: v for k, v in FAMILIES["sd15"]["text"].items() if k not in TEXT_IDS},
)

# SDXL's layout at tiny widths: no cross-attention at the finest level, several transformer layers
# per block at the coarsest, the U-Net conditioned on the pooled text and six time ids
# (addition_embed_type text_time), two text encoders of different widths (the second with a
# projection, whose width is the pooled embedding's).
_XL_TIME_DIM = 8
TINY_XL = dict(
    unet=dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=32 + 48,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=_XL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * _XL_TIME_DIM + 40, norm_num_groups=8,
    ),
    vae=dict(TINY["vae"], scaling_factor=0.13025),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    text_2=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, projection_dim=40,
                hidden_act="gelu"),
)

# Stable Diffusion XL base 1.0's shapes and layer names (its diffusers configs), for tests on the meta
# device where names and shapes matter.
SDXL = dict(
    unet=FAMILIES["sdxl"]["unet"], vae=FAMILIES["sdxl"]["vae"],
    **{part: {k: v for k, v in FAMILIES["sdxl"][part].items() if k not in TEXT_IDS} for part in ("text", "text_2")},
)

# The scheduler SDXL base ships (Euler, SD's noise schedule); training reads it as DDPM.
XL_SCHEDULER = dict(SD_SCHEDULER, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)

CONFIGS = {"tiny": TINY, "sd15": SD15, "tiny_xl": TINY_XL, "sdxl": SDXL}


def _text_encoder(cls, tokenizer, cfg: dict):
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **cfg))


def build_xl_model(kind: str = "tiny_xl", seed: int = 0) -> ModelBundle:
    """An SDXL-shaped bundle of random weights with the real classes: two tokenizers (the second pads
    with '!', as SDXL's does), CLIPTextModel + CLIPTextModelWithProjection, the text_time U-Net."""
    cfg = CONFIGS[kind]
    import tempfile

    if kind == "sdxl":
        from ..model_io.single_file import clip_tokenizer

        tokenizers = (clip_tokenizer(), clip_tokenizer(pad_token="!"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            first = save_tokenizer(tmp)
            second = clip_tokenizer_from_files(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt",
                                               pad_token="!", model_max_length=77)
        tokenizers = (first, second)
    torch.manual_seed(seed)
    text_encoders = (_text_encoder(CLIPTextModel, tokenizers[0], cfg["text"]),
                     _text_encoder(CLIPTextModelWithProjection, tokenizers[1], cfg["text_2"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    return ModelBundle(tokenizers, text_encoders, unet, vae, scheduler, source=f"random:{kind}:{seed}").freeze()


def build_model(kind: str = "tiny", seed: int = 0, tokenizer_dir: str | Path | None = None) -> ModelBundle:
    """A bundle of random weights with the real classes; `kind` is 'tiny', 'sd15', 'tiny_xl' or 'sdxl'."""
    if kind not in CONFIGS:
        raise ValueError(f"kind: unknown model kind {kind!r}; choose one of {sorted(CONFIGS)}")
    if "text_2" in CONFIGS[kind]:
        return build_xl_model(kind, seed)
    cfg = CONFIGS[kind]
    import tempfile

    if kind == "sd15":  # real shapes: the real CLIP vocabulary the project ships
        from ..model_io.single_file import clip_tokenizer

        tokenizer = clip_tokenizer()
        if tokenizer_dir:
            save_clip_tokenizer(tokenizer, tokenizer_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = save_tokenizer(tokenizer_dir or tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **cfg["text"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    return ModelBundle((tokenizer,), (text_encoder,), unet, vae, scheduler, source=f"random:{kind}:{seed}").freeze()


def save_bundle(bundle: ModelBundle, directory: str | Path) -> Path:
    """Writes the bundle as a diffusers pipeline folder any diffusers tool loads offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bundle.unet.save_pretrained(directory / "unet", safe_serialization=True)
    bundle.vae.save_pretrained(directory / "vae", safe_serialization=True)
    for i, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers)):
        suffix = f"_{i + 1}" if i else ""
        te.save_pretrained(directory / f"text_encoder{suffix}", safe_serialization=True)
        save_clip_tokenizer(tok, directory / f"tokenizer{suffix}")
    if bundle.is_xl:
        from diffusers import EulerDiscreteScheduler

        EulerDiscreteScheduler.from_config(bundle.scheduler.config, **XL_SCHEDULER).save_pretrained(
            directory / "scheduler")
        index = {
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "force_zeros_for_empty_prompt": True,
        }
        (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        return directory
    bundle.scheduler.save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return directory


def make_tiny_model(directory: str | Path, seed: int = 0, kind: str = "tiny") -> Path:
    return save_bundle(build_model(kind, seed=seed), directory)
