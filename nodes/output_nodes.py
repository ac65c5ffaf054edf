"""Nodes that use learned concepts: generate, save / load concept files, export, previews, and the way
into ComfyUI's own KSampler (a MODEL / CLIP carrying the concepts, and a [vN]-aware text encode)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from em_core.atomic import inside
from em_core.concept_file import load_concepts, save_concepts, state_from_concepts
from em_core.concepts import CONCEPT_RE
from em_core.export import check_export_name, embedding_name, export_embeddings, export_lora, lora_state_dict
from em_core.generate import SCHEDULERS, check_prompt_concepts, generate

from . import host
from .constants import CATEGORY, MODEL, STATE
from .convert import images_to_pil, pil_to_images
from .live import overlay
from .run_value import ConceptRun

FALLBACK_ROOT = Path("models")
EM_MODEL_TIP = "the model the concepts were learned on (Concept EM Model Loader / from checkpoint)"
CONCEPTS_TIP = "learned concepts: from EM Token Step, Joint Finetune or Load Concepts"


class ConceptGenerate:
    DESCRIPTION = ("Images from a prompt that names learned concepts as [v1], [v2], ..., with the engine's own "
                   "sampler and the concepts' fine-tuned weights if they have any. For ComfyUI's KSampler use "
                   "Apply Concepts To Model and Concept Text Encode instead.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL, {"tooltip": EM_MODEL_TIP}),
            "concepts": (STATE, {"tooltip": CONCEPTS_TIP}),
            "prompt": ("STRING", {"multiline": True, "default": "a photo of [v1] and [v2] in [v3]",
                                  "tooltip": "what to draw; [vN] stands for a learned concept"}),
            "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "what to steer away from"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "the starting noise"}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "sampling steps"}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "classifier-free guidance scale"}),
            "width": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8, "tooltip": "image width in pixels"}),
            "height": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8, "tooltip": "image height in pixels"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "images to make"}),
            "scheduler": (list(SCHEDULERS), {"default": "ddim", "tooltip": "the diffusers sampler"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("the generated images",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @host.trains
    @host.owns_device
    def run(self, em_model, concepts, prompt, negative, seed, steps, cfg, width, height, batch_size, scheduler):
        st = concepts.state
        images = generate(em_model, prompt, concepts=st.concepts, weights=st.weights, negative=negative, seed=seed,
                          steps=steps, guidance=cfg, scheduler=scheduler, width=width, height=height, n=batch_size,
                          progress=False, should_stop=host.interrupted)
        if host.interrupted():  # stopped part-way: the images are not denoised, so never cached as done
            host.raise_cancelled()
        return (pil_to_images(images),)


def numbered_file(folder: Path, name: str, suffix: str = ".safetensors") -> str:
    """NAME_00001_.safetensors, or one past the highest number NAME already has in `folder` (the
    numbering core SaveImage gives its images), so no earlier file is ever replaced."""
    pattern = re.compile(re.escape(os.path.normcase(name)) + r"_(\d+)_" + re.escape(suffix))
    taken = [int(m.group(1)) for p in (Path(folder).iterdir() if Path(folder).is_dir() else ())
             if (m := pattern.fullmatch(os.path.normcase(p.name)))]
    return f"{name}_{max(taken, default=0) + 1:05}_{suffix}"


class SaveConcepts:
    DESCRIPTION = ("Saves the learned concepts (tokens, masks, fine-tuned weights, settings) as one concept file "
                   "(.safetensors) in models/concepts, numbered like Save Image; Load Concepts reads it back.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"em_model": (MODEL, {"tooltip": EM_MODEL_TIP + "; recorded so a load can check it"}),
                             "concepts": (STATE, {"tooltip": CONCEPTS_TIP}),
                             "name": ("STRING", {"default": "my_concepts", "tooltip":
                                                 "saved as NAME_00001_.safetensors, NAME_00002_... in "
                                                 "models/concepts"}),
                             # Last, so a workflow saved before it existed keeps its name in place.
                             "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                                                       "on: write NAME.safetensors, replacing a concept file of that "
                                                       "name; off: a new numbered file every time"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, em_model, concepts, name, overwrite=False):
        check_export_name(name)
        folder = host.folder(host.CONCEPTS_FOLDER, FALLBACK_ROOT / host.CONCEPTS_FOLDER)
        file = f"{name}.safetensors" if overwrite else numbered_file(folder, name)
        path = save_concepts(concepts.state, em_model, inside(folder, file))
        return {"ui": {"text": [str(path)]}}


class LoadConcepts:
    DESCRIPTION = ("Loads a concept file saved by Save Concepts (models/concepts), for Concept Generate, Apply "
                   "Concepts To Model or Export. Learning further needs the images: start again from Attention "
                   "Mask Init for that.")

    @classmethod
    def INPUT_TYPES(cls):
        files = host.list_files(host.CONCEPTS_FOLDER, FALLBACK_ROOT / host.CONCEPTS_FOLDER)
        return {"required": {"em_model": (MODEL, {"tooltip": "the model to use the concepts with; checked against "
                                                             "the one they were learned on"}),
                             # The input's name stays "bundle": saved workflows (API format) key it so.
                             "bundle": (files or ["(none yet)"], {"tooltip": "a concept file in models/concepts "
                                                                             "(written by Save Concepts)"}),
                             "allow_other_model": ("BOOLEAN", {"default": False, "tooltip":
                                                               "load even if em_model is not the model the concepts "
                                                               "were learned on (same token width needed)"})}}

    RETURN_TYPES = (STATE,)
    RETURN_NAMES = ("concepts",)
    OUTPUT_TOOLTIPS = ("the loaded concepts (and fine-tuned weights)",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @host.trains
    def run(self, em_model, bundle, allow_other_model):
        check_export_name(Path(bundle).stem)
        folder = host.folder(host.CONCEPTS_FOLDER, FALLBACK_ROOT / host.CONCEPTS_FOLDER)
        cb = load_concepts(inside(folder, bundle), em_model, allow_other_model=allow_other_model)
        return (ConceptRun(state_from_concepts(cb), (), Path(bundle).stem),)


class ExportConceptsForComfy:
    """Embeddings into ComfyUI's embeddings folder and the weights as a LoRA into its loras folder."""

    DESCRIPTION = ("Writes each concept as a textual-inversion embedding (models/embeddings, used as "
                   "embedding:NAME_v1 in any prompt) and the fine-tuned weights as a LoRA (models/loras, for core "
                   "Load LoRA), so ordinary ComfyUI graphs can use them without this pack.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"concepts": (STATE, {"tooltip": CONCEPTS_TIP}),
                             "name": ("STRING", {"default": "my_concepts", "tooltip":
                                                 "file name stem: embeddings NAME_v1, NAME_v2...; LoRA NAME"}),
                             "lora_rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip":
                                                   "rank of the LoRA extracted from a full fine-tune (a LoRA "
                                                   "fine-tune keeps its own rank)"})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_hint",)
    OUTPUT_TOOLTIPS = ("which embedding name stands for which [vN], and the LoRA's file",)
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, concepts, name, lora_rank):
        st = concepts.state
        files = export_embeddings(st.concepts, host.folder("embeddings", FALLBACK_ROOT / "embeddings"), name)
        lines = [f"{n} -> embedding:{f.stem}" for n, f in zip(st.concepts.names, files)]
        if st.weights is not None:
            lora, skipped = export_lora(st.weights, host.folder("loras", FALLBACK_ROOT / "loras"), name, lora_rank,
                                        st.concepts.names)
            lines.append(f"LoRA: {lora.name}" + (f" ({len(skipped)} weights without a LoRA form left out)"
                                                  if skipped else ""))
        hint = "\n".join(lines)
        return {"ui": {"text": [hint]}, "result": (hint,)}


class MaskOverlayPreview:
    DESCRIPTION = "Draws masks over their image, one colour per concept, for a Preview Image node."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "the image(s) the masks belong to"}),
                             "masks": ("MASK", {"tooltip": "one mask per concept (per image, in order)"}),
                             "opacity": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                                   "tooltip": "how strongly the colours cover the image"})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("the image(s) with the masks drawn over",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, masks, opacity):
        pils = images_to_pil(image)
        m = masks.detach().float().cpu().numpy() > 0.5
        if m.ndim == 2:
            m = m[None]
        h, w = np.asarray(pils[0]).shape[:2]
        if m.shape[-2:] != (h, w):
            raise ValueError(f"masks: size {m.shape[-1]}x{m.shape[-2]} differs from the image's {w}x{h}")
        per = max(1, m.shape[0] // len(pils)) if m.shape[0] % len(pils) == 0 else m.shape[0]
        out = [overlay(np.asarray(p), m[i * per:(i + 1) * per] if per != m.shape[0] else m, opacity)
               for i, p in enumerate(pils)]
        return (pil_to_images(out),)


def to_embedding_prompt(text: str, name: str, known: list[str]) -> str:
    """'[v1] in [v3]' -> 'embedding:NAME_v1 in embedding:NAME_v3' for ComfyUI's own tokenizer."""
    check_prompt_concepts(text, known)
    return CONCEPT_RE.sub(lambda m: f" embedding:{embedding_name(name, m.group(0))} ", text).strip()


class ApplyConceptsToModel:
    """A MODEL and CLIP carrying the concepts, for ComfyUI's own samplers: the fine-tuned weights as a
    LoRA patch (ComfyUI's own loader; the inputs are cloned, not changed) and the token vectors
    written as embeddings, which Concept Text Encode refers to."""

    DESCRIPTION = ("Gives ComfyUI's own MODEL and CLIP the concepts: the fine-tuned weights as a LoRA patch (the "
                   "inputs are cloned, never changed) and the tokens as embeddings. Encode prompts with [vN] using "
                   "Concept Text Encode, then sample with KSampler.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "the MODEL of the checkpoint the concepts were learned on"}),
                             "clip": ("CLIP", {"tooltip": "the CLIP of that checkpoint"}),
                             "concepts": (STATE, {"tooltip": CONCEPTS_TIP}),
                             "name": ("STRING", {"default": "my_concepts", "tooltip":
                                                 "embedding file stem (models/embeddings/NAME_v1...); Concept Text "
                                                 "Encode refers to it"}),
                             "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                                    "tooltip": "LoRA strength on both MODEL and CLIP"}),
                             "lora_rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip":
                                                   "rank of the LoRA extracted from a full fine-tune"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "concept_name")
    OUTPUT_TOOLTIPS = ("the MODEL with the fine-tuned weights", "the CLIP with the fine-tuned weights",
                       "the embeddings' name, for Concept Text Encode")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, model, clip, concepts, name, strength, lora_rank):
        st = concepts.state
        export_embeddings(st.concepts, host.folder("embeddings", FALLBACK_ROOT / "embeddings"), name)
        if st.weights is None:
            return model, clip, name
        import comfy.sd  # only reachable inside ComfyUI

        lora, _ = lora_state_dict(st.weights, lora_rank)
        model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)
        return model, clip, name


class ConceptTextEncode:
    """CLIP Text Encode that understands [vN] (after Apply Concepts To Model)."""

    DESCRIPTION = ("CLIP Text Encode that understands [v1], [v2]...: each becomes the concept's embedding written "
                   "by Apply Concepts To Model. Use its clip and concept_name outputs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP", {"tooltip": "the clip output of Apply Concepts To Model"}),
                             "concept_name": ("STRING", {"default": "my_concepts", "tooltip":
                                                         "the concept_name output of Apply Concepts To Model"}),
                             "text": ("STRING", {"multiline": True, "default": "a photo of [v1] and [v2]",
                                                 "tooltip": "the prompt; [vN] stands for a learned concept"})},
                "optional": {"concepts": (STATE, {"tooltip": "optional: checks that every [vN] in the text was "
                                                             "learned"})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("the conditioning for KSampler",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, clip, concept_name, text, concepts=None):
        check_export_name(concept_name)
        known = concepts.state.concepts.names if concepts is not None else \
            [f"[v{n}]" for n in CONCEPT_RE.findall(text)]
        tokens = clip.tokenize(to_embedding_prompt(text, concept_name, known))
        return (clip.encode_from_tokens_scheduled(tokens),)
