"""Small random models of the real SD classes, for tests and the offline demo."""
from __future__ import annotations

from pathlib import Path

import torch
import json

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..model_io import ModelBundle
from ..model_io.sd_configs import FAMILIES, SD_SCHEDULER
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
_TOKENIZER_SET = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
SD15 = dict(
    unet=FAMILIES["sd15"]["unet"], vae=FAMILIES["sd15"]["vae"],
    text={k: v for k, v in FAMILIES["sd15"]["text"].items() if k not in _TOKENIZER_SET},
)

CONFIGS = {"tiny": TINY, "sd15": SD15}


def build_model(kind: str = "tiny", seed: int = 0, tokenizer_dir: str | Path | None = None) -> ModelBundle:
    """A bundle of random weights with the real classes; `kind` is 'tiny' or 'sd15'."""
    if kind not in CONFIGS:
        raise ValueError(f"kind: unknown model kind {kind!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[kind]
    import tempfile

    if kind == "sd15":  # real shapes: the real CLIP vocabulary the project ships
        from ..model_io.single_file import clip_tokenizer

        tokenizer = clip_tokenizer()
        if tokenizer_dir:
            tokenizer.save_pretrained(tokenizer_dir)
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
    bundle.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    bundle.tokenizer.save_pretrained(directory / "tokenizer")
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
