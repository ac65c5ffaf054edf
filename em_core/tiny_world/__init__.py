"""The tiny world: a research lab beside the engine, never imported by it. Procedural scenes with
true masks (scenes.py), the small latent diffusion model trained on them and shipped in model/
(world_train.py, tiny_model.py, tokenizer_build.py), the attribute checker (checker.py), the
evaluation of the engine's methods against the true masks (evaluate.py) and the binding probe
(world_probe.py). The demo, `python -m em_core evaluate`, the Tiny World Scene node, the
benchmarks and the tests use it."""
from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent / "model"
