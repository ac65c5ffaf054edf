"""Model input/output: loading a Stable Diffusion family model offline into the engine's
`ModelBundle` (diffusers folders in model.py, single-file LDM checkpoints in single_file.py), the
LDM key layout both ways (ldm_layout.py) and the shipped SD 1.x / 2.x configs and CLIP tokenizer
files (sd_configs.py, configs/). Imports nothing from the tiny world."""
from .bundle import ModelBundle
from .model import load_bundle

__all__ = ["ModelBundle", "load_bundle"]
