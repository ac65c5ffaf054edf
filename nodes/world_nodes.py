"""A tiny-world scene as an IMAGE, so the shipped tiny workflow needs no input file."""
from __future__ import annotations

from em_core.evaluate import concept_task
from em_core.scenes import random_scene

from .convert import pil_to_images

CATEGORY = "concept_em"


class TinyWorldScene:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3, "min": 0, "max": 2**31 - 1}),
                             "objects": ("INT", {"default": 2, "min": 1, "max": 4})}}

    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "prompt", "init_words")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, seed, objects):
        scene = random_scene(seed, n_objects=objects, max_overlap=0.1)
        prompt, init, _, _ = concept_task(scene)
        return pil_to_images([scene.image]), prompt, ", ".join(f"{k}={v}" for k, v in init.items())
