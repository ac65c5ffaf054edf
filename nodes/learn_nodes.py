"""Nodes for learning concepts: mask init, DenseCRF, EM token steps, joint fine-tune."""
from __future__ import annotations

import numpy as np
import torch

from em_core.config import LearnConfig
from em_core.crf import CRFParams, refine_masks
from em_core.dataset import check_prompts, prepare_image
from em_core.em_loop import continued, learn, refine_state_masks, start_state
from em_core.finetune import FinetuneConfig, finetune
from em_core.plot import line_chart
from em_core.precision import PRECISIONS, mixed_precision_for

from . import host, resume
from .constants import CATEGORY, MODEL, STATE
from .convert import images_to_pil, masks_to_tensor, pil_to_images
from .live import LiveFeed, forward_warnings
from .run_value import ConceptRun

CUTLER = CRFParams()  # the engine's defaults: CutLER's settings
CUSTOM = "used when preset is custom (defaults: CutLER's)"
LR_AUTO = "0 = auto: 2e-6 for full weights (Break-A-Scene), 1e-4 for LoRA (diffusers' LoRA examples)"
EM_MODEL_TIP = "the model from Concept EM Model Loader or Concept EM Model (from checkpoint)"
CONCEPTS_TIP = "the concept state from Attention Mask Init, DenseCRF Refine or another EM Token Step"


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

    DESCRIPTION = ("Starts learning concepts: a token for every [vN] named in the prompts (from its init word, or "
                   "random) and a first mask for each, read from the model's cross-attention averaged over random "
                   "timesteps and thresholded. Feed it to DenseCRF Refine, then EM Token Step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL, {"tooltip": EM_MODEL_TIP}),
            "images": ("IMAGE", {"tooltip": "the image(s) showing the concepts; several images are learned together"}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of [v1] and [v2] in [v3]",
                                   "tooltip": "one line per image (or one line for all), naming concepts as [vN]"}),
            "init_words": ("STRING", {"default": "", "tooltip": "e.g. [v1]=man, [v2]=dog; others start at random"}),
            "timesteps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip":
                                  "random timesteps whose cross-attention maps are averaged into the first masks"}),
            "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                                    "a pixel joins a concept's mask where that concept's normalised attention is the "
                                    "highest and at least this"}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                                     "token steps on the whole image before the masks are read (0: none; helps tokens "
                                     "that start at random)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                             "seeds the random tokens, timesteps and noise, so a run can be repeated"}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                   "tooltip": "working side in pixels; 0: the model's own (512 for SD 1.x and SD "
                                              "2.x-base, 768 for SD 2.x 768-v, 64 for the tiny world)"}),
        }}

    RETURN_TYPES = (STATE, "MASK")
    RETURN_NAMES = ("concepts", "masks")
    OUTPUT_TOOLTIPS = ("the tokens and masks, for DenseCRF Refine or EM Token Step",
                       "every concept's mask, image by image (for Mask Overlay Preview)")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    @host.owns_device
    def run(self, em_model, images, prompts, init_words, timesteps, threshold, warmup_steps, seed, resolution):
        pils = images_to_pil(images)
        lines = parse_prompts(prompts, len(pils))
        cfg = LearnConfig(steps=0, refresh_every=0, mask_timesteps=timesteps, threshold=threshold, use_crf=False,
                          warmup_steps=warmup_steps, seed=seed, resolution=resolution or None)
        prepared = [prepare_image(em_model, None, p, cfg.resolution, cfg.flip, pil=im) for im, p in zip(pils, lines)]
        state = learn(em_model, prepared, start_state(em_model, prepared, cfg, parse_init_words(init_words)),
                      progress=False, should_stop=host.interrupted)
        if state.status == "cancelled":  # stopped during the warm-up: never cached as done
            host.raise_cancelled()
        run = ConceptRun(state, tuple(prepared))
        return run, state_masks(run)


class DenseCRFRefine:
    """DenseCRF against the image: on a concept state's masks, or on any IMAGE + MASK."""

    DESCRIPTION = ("Snaps masks to the image's edges and colours with a fully connected CRF (DenseCRF, CutLER's "
                   "settings by default). Works on a concept state's masks, or on any IMAGE with a MASK.")

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
        }, "optional": {"concepts": (STATE, {"tooltip": "a concept state whose masks are refined (connect this, or "
                                                      "image and mask)"}),
                         "image": ("IMAGE", {"tooltip": "without concepts: the image the mask is refined against"}),
                         "mask": ("MASK", {"tooltip": "without concepts: the mask(s) to refine, one per concept, or "
                                                      "one per image"})}}

    RETURN_TYPES = (STATE, "MASK")
    RETURN_NAMES = ("concepts", "masks")
    OUTPUT_TOOLTIPS = ("the concept state with refined masks (nothing when image and mask were given)",
                       "the refined masks")
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
            run = concepts.with_state(refine_state_masks(concepts.state, list(concepts.images), params))
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

    DESCRIPTION = ("The EM loop: trains the concept tokens under their masks (masked diffusion loss plus an "
                   "attention loss), and every refresh_every steps re-estimates the masks from the tokens' own "
                   "attention (then DenseCRF). Chain several with different settings; the node shows the masks and "
                   "the loss live. Cancel keeps what was learned: queue the same graph again to go on.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL, {"tooltip": EM_MODEL_TIP}),
            "concepts": (STATE, {"tooltip": CONCEPTS_TIP}),
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000, "tooltip":
                              "EM steps this node runs: its output has this many more than the incoming state "
                              "(chained nodes add up; the CLI's learn --steps counts the same way)"}),
            "learning_rate": ("FLOAT", {"default": 5e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "tooltip":
                                        "AdamW learning rate of the token vectors (Break-A-Scene: 5e-4)"}),
            "attention_loss_weight": ("FLOAT", {"default": 1e-2, "min": 0.0, "max": 10.0, "step": 1e-3, "tooltip":
                                                "weight of the loss pulling each token's attention onto its mask "
                                                "(Break-A-Scene: 1e-2; 0: masked diffusion loss only)"}),
            "refresh_every": ("INT", {"default": 50, "min": 0, "max": 100000, "tooltip": "0: keep the masks"}),
            "use_crf": ("BOOLEAN", {"default": True, "tooltip": "refine each refreshed mask with DenseCRF"}),
            "refresh_timesteps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip":
                                          "timesteps (stratified) of each refresh; 30 match the accuracy of 50 "
                                          "independent ones"}),
            "flip": ("BOOLEAN", {"default": True, "tooltip": "train on mirrored images half of the time"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (STATE, "MASK", "IMAGE")
    RETURN_NAMES = ("concepts", "masks", "curve")
    OUTPUT_TOOLTIPS = ("the state after these steps, for another EM Token Step, Joint Finetune or the output nodes",
                       "every concept's mask now", "the loss and mask-change curve of the whole run")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    @host.owns_device
    def run(self, em_model, concepts, steps, learning_rate, attention_loss_weight, refresh_every, use_crf,
            refresh_timesteps, flip, unique_id=None):
        concepts.require_images("EM Token Step")
        done = concepts.state.step - concepts.state.config.warmup_steps
        state = continued(concepts.state, steps, lr=learning_rate, attn_weight=attention_loss_weight,
                          refresh_every=refresh_every, use_crf=use_crf, refresh_timesteps=refresh_timesteps, flip=flip)
        settings = dict(steps=steps, lr=learning_rate, attn=attention_loss_weight, refresh=refresh_every,
                        crf=use_crf, refresh_timesteps=refresh_timesteps, flip=flip)
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

    DESCRIPTION = ("Break-A-Scene's second stage: the tokens and the model's weights (a LoRA, or all of them) train "
                   "together under the fixed masks. The model you loaded is never changed: the result travels with "
                   "the concepts (Concept Generate, Save Concepts, Apply Concepts To Model). Shows the loss "
                   "live; Cancel keeps what was learned.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "em_model": (MODEL, {"tooltip": EM_MODEL_TIP}),
            "concepts": (STATE, {"tooltip": "the concept state after EM Token Step"}),
            "steps": ("INT", {"default": 400, "min": 1, "max": 100000, "tooltip":
                              "fine-tune steps this node runs: its output has this many more than the incoming "
                              "state (the CLI's finetune --steps counts the same way)"}),
            # 0 stands for auto; web/concept_em.js shows it as "auto" on the widget.
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6, "tooltip": LR_AUTO}),
            "mode": (["full", "lora"], {"default": "lora", "tooltip":
                                        "lora: small low-rank adapters (MBs, exported as a LoRA); full: every weight "
                                        "(as Break-A-Scene; needs far more memory)"}),
            "lora_rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "rank of the LoRA adapters (mode lora)"}),
            "train_text_encoder": ("BOOLEAN", {"default": True, "tooltip":
                                               "train the text encoder's weights too (Break-A-Scene does)"}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip":
                                                   "recompute activations in the backward pass: less memory, slower"}),
            # Last, so a workflow saved before it existed keeps its other widget values in place.
            "mixed_precision": (PRECISIONS, {"default": "auto", "tooltip":
                                             "auto: bf16 on a CUDA GPU that supports it, fp16 on one that does not, "
                                             "fp32 elsewhere. fp16 needs a CUDA GPU; bf16 a CUDA GPU with bf16 (or "
                                             "the CPU, slowly)"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (STATE, "IMAGE")
    RETURN_NAMES = ("concepts", "curve")
    OUTPUT_TOOLTIPS = ("the concepts with their fine-tuned weights", "the loss curve of the whole run")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @forward_warnings
    @host.trains
    @host.owns_device
    def run(self, em_model, concepts, steps, learning_rate, mode, lora_rank, train_text_encoder,
            gradient_checkpointing, mixed_precision="auto", unique_id=None):
        concepts.require_images("Joint Finetune")
        precision = mixed_precision_for(mixed_precision, em_model.device)
        state = concepts.state
        done = state.finetune["step"] if state.finetune else 0
        cfg = FinetuneConfig(steps=done + steps, mode=mode, lr=learning_rate or None, rank=lora_rank,
                             train_text_encoder=train_text_encoder, gradient_checkpointing=gradient_checkpointing,
                             mixed_precision=precision)
        settings = dict(steps=steps, lr=learning_rate, mode=mode, rank=lora_rank, te=train_text_encoder,
                        ckpt=gradient_checkpointing, precision=cfg.mixed_precision)
        folder = resume.checkpoint_dir("finetune", resume.run_key("finetune", em_model, concepts, settings))
        ft_step = lambda s: s.finetune["step"] if s.finetune else 0  # noqa: E731
        state, since = resume.resumed(folder, state, ft_step)
        feed = LiveFeed(unique_id, steps, concepts.images, resumed_at=None if since is None else since - done)
        # A half-precision model is trained as loaded: the engine keeps LoRA adapters in float32
        # (em_core/finetune.py), so lifting the whole model would only cost memory.
        state = finetune(em_model, list(concepts.images), state, cfg, out=folder, progress=False,
                         should_stop=host.interrupted, on_step=feed.on_step, run_from=done)
        resume.finish(folder, state.finetune["status"], "Joint Finetune")
        return concepts.with_state(state), curve_image(state)

