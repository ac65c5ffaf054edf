"""Runs that cross a process boundary: a fresh process loads a model whose tokenizer has never
seen the concept tokens, so a resume or a CLI fine-tune must give the same result as one process.
(Reading ids before registering gave every concept the unknown token's id: issue 13.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from em_core.cli import main
from em_core.dataset import prepare_image
from em_core.finetune import FinetuneConfig, finetune
from em_core.model_io import load_bundle
from em_core.state import load_state

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "em_core", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _learn(model, scene, out, steps):
    _cli("learn", "--model", model, "--image", scene, "--prompt", "a photo of [v1] and [v2] on [v3]",
         "--init", "[v1]=red", "--steps", steps, "--refresh-every", "3", "--mask-timesteps", "4",
         "--refresh-timesteps", "4", "--save-every", "1", "--out", out, "--quiet")


def _same_files(a: Path, b: Path, name: str) -> None:
    ta, tb = load_file(a / name), load_file(b / name)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs (max {float((ta[k].float() - tb[k].float()).abs().max())})"


def _untimed(value):
    """The history without its wall-clock fields, which differ between any two runs."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def test_a_run_resumed_in_new_processes_equals_an_unbroken_one_bit_for_bit(tiny_dir, scene_files, tmp_path):
    scene = scene_files[0][0]
    _learn(tiny_dir, scene, tmp_path / "whole", 7)
    # Stopped right before the refresh at step 3 and mid-interval at step 4, each continued in a new
    # process: --steps counts from where the state stands (3, then 1 more, then 3 more).
    for steps in (3, 1, 3):
        _learn(tiny_dir, scene, tmp_path / "parts", steps)
    whole, parts = load_state(tmp_path / "whole"), load_state(tmp_path / "parts")
    assert parts.step == whole.step == 7
    assert [r["step"] for r in parts.history["refreshes"]] == [0, 3, 6]
    _same_files(tmp_path / "whole", tmp_path / "parts", "state.safetensors")
    assert _untimed(json.loads((tmp_path / "whole" / "history.json").read_text())) == \
        _untimed(json.loads((tmp_path / "parts" / "history.json").read_text()))


def test_a_cli_fine_tune_in_a_new_process_matches_one_in_process(tiny_dir, scene_files, tmp_path):
    scene = scene_files[0][0]
    run = tmp_path / "run"
    assert main(["learn", "--model", str(tiny_dir), "--image", str(scene), "--prompt",
                 "a photo of [v1] and [v2] on [v3]", "--steps", "2", "--refresh-every", "0",
                 "--mask-timesteps", "4", "--out", str(run), "--quiet"]) == 0
    shutil.copytree(run, tmp_path / "cli")
    _cli("finetune", "--state", tmp_path / "cli", "--steps", "2", "--mode", "full", "--lr", "1e-3", "--quiet")
    # In process: the same model with the concept tokens already registered by a learn run.
    bundle = load_bundle(tiny_dir)
    state = load_state(run)
    state.concepts.token_ids(bundle)
    images = [prepare_image(bundle, r["path"], r["prompt"], state.config.resolution, state.config.flip)
              for r in state.images]
    finetune(bundle, images, state, FinetuneConfig(steps=2, mode="full", lr=1e-3), out=tmp_path / "inproc",
             progress=False)
    _same_files(tmp_path / "cli", tmp_path / "inproc", "concepts.safetensors")
    _same_files(tmp_path / "cli", tmp_path / "inproc", "weights.safetensors")
