"""Live preview while EM Token Step and Joint Finetune run: the node's progress bar, and the
current masks over the image plus the loss history sent to web/concept_em.js."""
from __future__ import annotations

import base64
import functools
import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from . import host
from .constants import LOGGER

LOG = logging.getLogger(LOGGER)

EVENT = "concept_em.progress"
WARNING_EVENT = "concept_em.warning"
PACK_DIR = Path(__file__).resolve().parents[1]
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                    (240, 50, 230), (210, 245, 60)], np.float32)


def overlay(rgb: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Each concept's mask tinted in its own colour over the image."""
    out = np.asarray(rgb, np.float32).copy()
    for k, m in enumerate(np.asarray(masks, bool)):
        out[m] = (1 - alpha) * out[m] + alpha * PALETTE[k % len(PALETTE)]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), "RGB")


def _png64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LiveFeed:
    """on_step callbacks for em_core's loops; sends at most every `every` steps and at each refresh."""

    def __init__(self, node_id, total: int, images, every: int = 5, resumed_at: int | None = None):
        self.node_id, self.total, self.images, self.every = node_id, max(1, total), images, every
        self.progress = host.Progress(self.total, node_id)
        self.done = resumed_at or 0
        self.resumed_at = resumed_at
        if resumed_at:
            LOG.info(f"resuming from step {resumed_at} of {total}: a checkpoint of the cancelled run")
            host.send(EVENT, {"node": node_id, "step": resumed_at, "total": self.total, "losses": [],
                              "note": f"resumed from step {resumed_at} (the cancelled run's checkpoint)"})
        self.losses: list[float] = []
        self.last_refresh = None

    def _send(self, state, masks_changed: bool) -> None:
        data = {"node": self.node_id, "step": self.done, "total": self.total, "losses": self.losses[-400:]}
        if masks_changed and self.images and state.masks and state.masks[0] is not None:
            data["masks"] = _png64(overlay(self.images[0].rgb, state.masks[0]))
            data["names"] = list(self.images[0].names)
        host.send(EVENT, data)

    def on_step(self, state, info) -> None:
        self.done += 1
        self.losses.append(float(info["loss"]))
        self.progress.update(self.done, self.total)
        refresh = state.history["refreshes"][-1]["step"] if state.history["refreshes"] else None
        changed = refresh != self.last_refresh
        self.last_refresh = refresh
        if changed or self.done % self.every == 0 or self.done == self.total:
            self._send(state, changed or self.done == 1)


def _from_pack(w: warnings.WarningMessage) -> bool:
    """A warning the engine or the nodes raised (an empty mask's fallback, a concept DenseCRF wiped
    out, a precision the device lacks), not one of a library's."""
    try:
        return issubclass(w.category, UserWarning) and PACK_DIR in Path(w.filename).resolve().parents
    except (OSError, TypeError, ValueError):
        return False


def forward_warnings(run):
    """Wraps a node's run method: the pack's warnings still reach the server console, and are also
    sent to the browser that queued the prompt (event concept_em.warning: node, class, messages)
    and added to the node's text output when it has one ({"ui": {"text": [...]}})."""

    @functools.wraps(run)
    def wrapped(self, *args, **kwargs):
        caught: list = []
        result = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                result = run(self, *args, **kwargs)
            return result
        finally:
            for w in caught:  # to the console (or an outer recorder) as if never caught
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
            messages = list(dict.fromkeys(str(w.message) for w in caught if _from_pack(w)))
            if messages:
                node = kwargs.get("unique_id") or host.current_node()
                host.send(WARNING_EVENT, {"node": node, "class": type(self).__name__, "messages": messages})
                if isinstance(result, dict) and isinstance(result.get("ui"), dict):
                    result["ui"]["text"] = list(result["ui"].get("text", [])) + [f"warning: {m}" for m in messages]

    return wrapped
