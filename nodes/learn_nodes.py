"""Nodes for learning concepts: mask init, DenseCRF, EM token steps, joint fine-tune."""
from __future__ import annotations

import numpy as np
import torch

from em_core.config import LearnConfig
from em_core.crf import CRFParams, refine_masks
from em_core.dataset import check_prompts, prepare_image
from em_core.em_loop import learn, start_state
from em_core.finetune import FinetuneConfig, finetune
from em_core.masks import latent_masks, refine_keeping
from em_core.plot import line_chart

from . import host, resume
from .convert import images_to_pil, masks_to_tensor, pil_to_images
from .live import LiveFeed, forward_warnings
from .run_value import ConceptRun

CATEGORY = "concept_em"
STATE = "CONCEPT_EM_STATE"
MODEL = "CONCEPT_EM_MODEL"
CUTLER = CRFParams()  # the engine's defaults: CutLER's settings
CUSTOM = "used when preset is custom (defaults: CutLER's)"


def parse_prompts(text: str, n_images: int) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and n_images > 1:
        lines = lines * n_images  # one prompt for every image
    check_prompts(list(range(n_images)), lines)
    return lines


def parse_init_words(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.replace("\n", ",").split(","))):
        if "=" not in part:
            raise ValueError(f"init words: {part!r} is not of the form [vN]=word (e.g. [v1]=man, [v2]=dog)")
        k, v = (s.strip() for s in part.split("=", 1))
        out[k] = v
    return out


def state_masks(run: ConceptRun) -> torch.Tensor:
    """Every concept mask of every image as one MASK batch, image by image, at the first image's size."""
    st = run.state
    masks = [m for per in st.masks if per is not None for m in per]
    size = tuple(st.images[0]["original_size"]) if st.images else None
    return masks_to_tensor(masks, size)


def curve_image(state) -> torch.Tensor:
    steps = state.history["steps"] + state.history.get("finetune", [])
    series = {"loss": [(i, h["loss"]) for i, h in enumerate(steps)]}
    change = [(r["step"], float(np.mean([v for per in r["change"].values() for v in per.values()])))
              for r in state.history["refreshes"] if r["change"]]
    if change:
        series["mask change"] = change
    return pil_to_images([line_chart(series, title="loss and mask change", xlabel="step")])


class AttentionMaskInit:
    """Tokens for every [vN] in the prompts and their first masks, from cross-attention over random timesteps."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL,),
            "images": ("IMAGE",),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of [v1] and [v2] in [v3]",
                                   "tooltip": "one line per image (or one line for all), naming concepts as [vN]"}),
            "init_words": ("STRING", {"default": "", "tooltip": "e.g. [v1]=man, [v2]=dog; others start at random"}),
            "timesteps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.99, "step": 0.01}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                   "tooltip": "working side in pixels; 0: the model's own"}),
        }}

    RETURN_TYPES = (STATE, "MASK")
    RETURN_NAMES = ("concepts", "masks")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    def run(self, em_model, images, prompts, init_words, timesteps, threshold, warmup_steps, seed, resolution):
        pils = images_to_pil(images)
        lines = parse_prompts(prompts, len(pils))
        cfg = LearnConfig(steps=0, refresh_every=0, mask_timesteps=timesteps, threshold=threshold, use_crf=False,
                          warmup_steps=warmup_steps, seed=seed, resolution=resolution or None)
        prepared = [prepare_image(em_model, None, p, cfg.resolution, cfg.flip, pil=im) for im, p in zip(pils, lines)]
        state = learn(em_model, prepared, start_state(em_model, prepared, cfg, parse_init_words(init_words)),
                      progress=False, should_stop=host.interrupted)
        run = ConceptRun(state, tuple(prepared))
        return run, state_masks(run)


class DenseCRFRefine:
    """DenseCRF against the image: on a concept state's masks, or on any IMAGE + MASK."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "iterations": ("INT", {"default": CUTLER.iterations, "min": 1, "max": 100, "tooltip": CUSTOM}),
            "gaussian_sxy": ("FLOAT", {"default": CUTLER.gaussian_sxy, "min": 0.1, "max": 100.0, "tooltip": CUSTOM}),
            "gaussian_weight": ("FLOAT", {"default": CUTLER.gaussian_weight, "min": 0.0, "max": 100.0,
                                         "tooltip": CUSTOM}),
            "bilateral_sxy": ("FLOAT", {"default": CUTLER.bilateral_sxy, "min": 0.1, "max": 1000.0, "tooltip": CUSTOM}),
            "bilateral_srgb": ("FLOAT", {"default": CUTLER.bilateral_srgb, "min": 0.1, "max": 255.0,
                                         "tooltip": CUSTOM}),
            "bilateral_weight": ("FLOAT", {"default": CUTLER.bilateral_weight, "min": 0.0, "max": 100.0,
                                          "tooltip": CUSTOM}),
            "working_side": ("INT", {"default": CUTLER.max_side or 0, "min": 0, "max": 16384, "tooltip":
                                     "DenseCRF runs with the longer side at most this many pixels (0: full size)"}),
            # Last, so a workflow saved before it existed loads its other values in place (and gets CutLER's).
            "preset": (["cutler", "deeplab", "custom"], {
                "default": "cutler", "tooltip": "cutler: CutLER's settings, the paper's choice (10 iterations; "
                "Gaussian sxy 3, weight 7; bilateral sxy 50, srgb 5, weight 10); deeplab: DeepLab-v2's (sxy 1, "
                "weight 3; sxy 67, srgb 3, weight 4); custom: the six values above"}),
        }, "optional": {"concepts": (STATE,), "image": ("IMAGE",), "mask": ("MASK",)}}

    RETURN_TYPES = (STATE, "MASK")
    RETURN_NAMES = ("concepts", "masks")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    def run(self, iterations, gaussian_sxy, gaussian_weight, bilateral_sxy, bilateral_srgb, bilateral_weight,
            working_side=256, preset="cutler", concepts=None, image=None, mask=None):
        if preset == "custom":
            params = CRFParams(iterations, gaussian_sxy, gaussian_weight, bilateral_sxy, bilateral_srgb,
                               bilateral_weight, max_side=working_side or None)
        else:
            params = CRFParams.preset(preset, max_side=working_side or None)
        if concepts is not None:
            concepts.require_images("DenseCRF Refine")
            state = concepts.state.copy()
            for i, img in enumerate(concepts.images):
                state.masks[i] = refine_keeping(img, state.masks[i], params, set(state.fixed[i]))
            state.mask_history.append({"step": state.step, "masks": [latent_masks(m, img.latent_hw)
                                                                      for m, img in zip(state.masks, concepts.images)]})
            state.history["refreshes"].append({"step": state.step, "kind": "crf", "change": {}})
            run = concepts.with_state(state)
            return run, state_masks(run)
        if image is None or mask is None:
            raise ValueError("DenseCRF Refine: connect either concepts, or an image and a mask")
        pils = images_to_pil(image)
        if mask.ndim == 2:
            mask = mask[None]
        w, h = pils[0].size
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"mask: its size {tuple(mask.shape[-2:])[::-1]} differs from the image's {(w, h)}; "
                             "resize the mask to the image first")
        m = mask.detach().float().cpu().numpy() > 0.5
        if len(pils) == 1:
            refined = refine_masks(np.asarray(pils[0]), m, params)
        elif len(pils) == m.shape[0]:
            refined = np.stack([refine_masks(np.asarray(p), m[i:i + 1], params)[0] for i, p in enumerate(pils)])
        else:
            raise ValueError(f"mask: {m.shape[0]} masks for {len(pils)} images; give one image with any number of "
                             "masks (one per concept), or one mask per image")
        return None, masks_to_tensor(list(refined))


class EMTokenStep:
    """More EM steps: tokens under the masks, masks re-estimated every `refresh_every` steps. Chainable."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL,),
            "concepts": (STATE,),
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000}),
            "learning_rate": ("FLOAT", {"default": 5e-4, "min": 1e-7, "max": 1.0, "step": 1e-5}),
            "attention_loss_weight": ("FLOAT", {"default": 1e-2, "min": 0.0, "max": 10.0, "step": 1e-3}),
            "refresh_every": ("INT", {"default": 50, "min": 0, "max": 100000, "tooltip": "0: keep the masks"}),
            "use_crf": ("BOOLEAN", {"default": True}),
            "refresh_timesteps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip":
                                          "timesteps (stratified) of each refresh; 30 match the accuracy of 50 "
                                          "independent ones"}),
            "flip": ("BOOLEAN", {"default": True}),
            "mask_source": (["fresh", "training"], {
                "default": "fresh",
                "tooltip": "fresh: new U-Net passes over refresh_timesteps timesteps at each refresh (the paper); "
                           "training: from the maps the steps already computed (almost free, noisier masks)"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (STATE, "MASK", "IMAGE")
    RETURN_NAMES = ("concepts", "masks", "curve")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    def run(self, em_model, concepts, steps, learning_rate, attention_loss_weight, refresh_every, use_crf,
            refresh_timesteps, flip, mask_source="fresh", unique_id=None):
        concepts.require_images("EM Token Step")
        state = concepts.state.copy()
        done = state.step - state.config.warmup_steps
        cfg = state.config
        cfg.steps, cfg.lr, cfg.attn_weight, cfg.refresh_every = done + steps, learning_rate, attention_loss_weight, \
            refresh_every
        cfg.use_crf, cfg.refresh_timesteps, cfg.flip, cfg.mask_source = use_crf, refresh_timesteps, flip, mask_source
        settings = dict(steps=steps, lr=learning_rate, attn=attention_loss_weight, refresh=refresh_every,
                        crf=use_crf, refresh_timesteps=refresh_timesteps, flip=flip, source=mask_source)
        folder = resume.checkpoint_dir("em", resume.run_key("em", em_model, concepts, settings))
        state, since = resume.resumed(folder, state, lambda s: s.step)
        feed = LiveFeed(unique_id, steps, concepts.images, resumed_at=None if since is None else since - done)
        state = learn(em_model, list(concepts.images), state, out=folder, progress=False,
                      should_stop=host.interrupted, on_step=feed.on_step)
        resume.finish(folder, state.status, "EM Token Step")
        run = concepts.with_state(state)
        return run, state_masks(run), curve_image(state)


class JointFinetune:
    """Tokens and model weights together, masks fixed; the base model is never changed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL,),
            "concepts": (STATE,),
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6,
                                        "tooltip": "0: 2e-6 for full weights, 1e-4 for LoRA"}),
            "mode": (["full", "lora"], {"default": "lora"}),
            "lora_rank": ("INT", {"default": 4, "min": 1, "max": 256}),
            "train_text_encoder": ("BOOLEAN", {"default": True}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (STATE, "IMAGE")
    RETURN_NAMES = ("concepts", "curve")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    def run(self, em_model, concepts, steps, learning_rate, mode, lora_rank, train_text_encoder,
            gradient_checkpointing, unique_id=None):
        concepts.require_images("Joint Finetune")
        state = concepts.state
        done = state.finetune["step"] if state.finetune else 0
        cfg = FinetuneConfig(steps=done + steps, mode=mode, lr=learning_rate or None, rank=lora_rank,
                             train_text_encoder=train_text_encoder, gradient_checkpointing=gradient_checkpointing,
                             mixed_precision="bf16" if em_model.device.type == "cuda" else "no")
        settings = dict(steps=steps, lr=learning_rate, mode=mode, rank=lora_rank, te=train_text_encoder,
                        ckpt=gradient_checkpointing, precision=cfg.mixed_precision)
        folder = resume.checkpoint_dir("finetune", resume.run_key("finetune", em_model, concepts, settings))
        ft_step = lambda s: s.finetune["step"] if s.finetune else 0  # noqa: E731
        state, since = resume.resumed(folder, state, ft_step)
        feed = LiveFeed(unique_id, steps, concepts.images, resumed_at=None if since is None else since - done)
        state = finetune(em_model, list(concepts.images), state, cfg, out=folder, progress=False,
                         should_stop=host.interrupted, on_step=feed.on_step)
        resume.finish(folder, state.finetune["status"], "Joint Finetune")
        return concepts.with_state(state), curve_image(state)

