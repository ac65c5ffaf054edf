"""A tiny-world scene as an IMAGE, so the shipped tiny workflow needs no input file."""
from __future__ import annotations

from em_core.tiny_world.evaluate import concept_task
from em_core.tiny_world.scenes import random_scene

from .constants import CATEGORY
from .convert import pil_to_images


class TinyWorldScene:
    DESCRIPTION = ("A 64 px scene of coloured shapes from the tiny world the shipped model was trained on, with a "
                   "prompt naming each object and the background as [vN] and their init words, so the tiny "
                   "workflow needs no input file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3, "min": 0, "max": 2**31 - 1,
                                              "tooltip": "which scene; the same seed gives the same scene"}),
                             "objects": ("INT", {"default": 2, "min": 1, "max": 4,
                                                 "tooltip": "shapes in the scene (each a concept, plus the ground)"})}}

    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("image", "prompt", "init_words")
    OUTPUT_TOOLTIPS = ("the scene", "its prompt with [vN] per object and the ground",
                       "each concept's init word, for Attention Mask Init")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, seed, objects):
        scene = random_scene(seed, n_objects=objects, max_overlap=0.1)
        prompt, init, _, _ = concept_task(scene)
        return pil_to_images([scene.image]), prompt, ", ".join(f"{k}={v}" for k, v in init.items())
