"""Cancel in ComfyUI keeps what was learned: a learning node runs with a checkpoint folder keyed
by its inputs, raises ComfyUI's interruption when cancelled (so the truncated result is never
cached as done), and a re-queue of the same graph resumes from the checkpoint."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from . import host
from .constants import LOGGER

LOG = logging.getLogger(LOGGER)


def _digest_tensor(h, t) -> None:
    if t is None:
        h.update(b"none")
        return
    a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())


def run_key(kind: str, em_model, run, settings: dict) -> str:
    """A digest of what decides the node's result: its kind and settings, the model, and the
    incoming concept state (tokens, masks, steps done, fine-tuned weights) and images."""
    h = hashlib.sha256()
    st = run.state
    head = {"kind": kind, "settings": settings, "model": getattr(em_model, "source", ""), "step": st.step,
            "finetune": st.finetune, "config": st.config.to_dict(), "images": st.images}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    _digest_tensor(h, st.concepts.vectors)
    for m in st.masks:
        _digest_tensor(h, m)
    for img in run.images:
        _digest_tensor(h, img.latent_mean)
    if st.weights is not None:
        for name, t in sorted(st.weights.tensors.items()):
            h.update(name.encode())
            _digest_tensor(h, t)
    return h.hexdigest()[:24]


def checkpoint_dir(kind: str, key: str) -> Path:
    return host.resume_root() / f"{kind}_{key}"


def resumed(folder: Path, state, step_of):
    """The checkpoint's state when it went further than `state`, else `state`; and the step it
    resumes from (None when it starts afresh)."""
    from em_core.state import load_state

    if not (folder / "state.safetensors").is_file():
        return state, None
    try:
        saved = load_state(folder)
    except (OSError, ValueError) as e:
        LOG.warning(f"checkpoint {folder} unreadable ({e}); starting afresh")
        return state, None
    if step_of(saved) <= step_of(state):
        return state, None
    return saved, step_of(saved)


def finish(folder: Path, status: str, what: str) -> None:
    """Raises ComfyUI's interruption for a cancelled run (its checkpoint stays on disk); removes
    the checkpoint of a run that finished."""
    if status == "cancelled":
        LOG.info(f"{what} cancelled; what it learned is kept in {folder}: queue the same graph "
                 "again to resume")
        host.raise_cancelled()
    shutil.rmtree(folder, ignore_errors=True)
