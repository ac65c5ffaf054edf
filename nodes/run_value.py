"""The value that flows between the learning nodes: the engine's state plus its prepared images.

Nodes never change one in place (ComfyUI caches outputs): each node returns a new value.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConceptRun:
    state: object  # em_core.state.LearnState
    # em_core.dataset.TrainImage, one per input image; empty for a loaded concept file
    images: tuple = field(default=())
    name: str = "concepts"

    def with_state(self, state) -> "ConceptRun":
        return ConceptRun(state, self.images, self.name)

    def require_images(self, what: str) -> None:
        if not self.images:
            raise ValueError(f"{what}: this concept state came from a saved concept file without its images; "
                             "learning needs the images (start from Attention Mask Init)")
