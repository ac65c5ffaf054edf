"""Live preview while EM Token Step and Joint Finetune run: the node's progress bar, and the
current masks over the image plus the loss history sent to web/concept_em.js."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from . import host

EVENT = "concept_em.progress"
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

    def __init__(self, node_id, total: int, images, every: int = 5):
        self.node_id, self.total, self.images, self.every = node_id, max(1, total), images, every
        self.progress = host.Progress(self.total, node_id)
        self.done = 0
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
