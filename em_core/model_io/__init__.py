"""Model input/output: loading a Stable Diffusion family model offline into the engine's
`ModelBundle` (diffusers folders in model.py, single-file LDM checkpoints in single_file.py), the
LDM key layout both ways (ldm_layout.py) and the shipped SD 1.x / 2.x / XL configs and CLIP tokenizer
files (sd_configs.py, configs/). Imports nothing from the tiny world."""
from .bundle import FAMILY_NAMES, TEXT_ENCODER_NAMES, ModelBundle
from .model import load_bundle

__all__ = ["FAMILY_NAMES", "TEXT_ENCODER_NAMES", "ModelBundle", "load_bundle"]
