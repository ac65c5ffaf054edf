"""Generation with learned concepts: diffusers' Stable Diffusion (or, for SDXL, Stable Diffusion XL)
pipeline over the bundle's parts, with the concept vectors injected and the fine-tuned weights
applied only for the call. Prompts are encoded here (the pipelines' tokenizers do not know `[vN]`)
and handed over as prompt_embeds (and SDXL's pooled_prompt_embeds).
"""
from __future__ import annotations

import contextlib

import torch

from .concepts import concept_names, encode_text, injected
from .weights import applied

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def make_scheduler(bundle, name: str):
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown {name!r}; choose one of {', '.join(SCHEDULERS)}")
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(bundle.scheduler.config, **extra)


def check_prompt_concepts(prompt: str, known: list[str], what: str = "prompt") -> None:
    unknown = [n for n in concept_names(prompt) if n not in known]
    if unknown:
        have = ", ".join(known) if known else "none (no concepts loaded)"
        raise ValueError(f"{what}: names {', '.join(unknown)}, which these concepts lack; they are {have}")


def make_pipeline(bundle, scheduler: str = "ddim"):
    if bundle.is_xl:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet,
            scheduler=make_scheduler(bundle, scheduler), force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=make_scheduler(bundle, scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def generate(bundle, prompt: str, *, concepts=None, weights=None, negative: str = "", seed: int = 0,
             steps: int = 30, guidance: float = 7.5, scheduler: str = "ddim", width: int | None = None,
             height: int | None = None, n: int = 1, progress: bool = True, should_stop=None,
             weight_scale: float = 1.0):
    """PIL images for `prompt` ("[v1] shaking hands with a robot in [v3]"); same seed, same images."""
    known = concepts.names if concepts is not None else []
    check_prompt_concepts(prompt, known)
    check_prompt_concepts(negative, known, "negative prompt")
    width = width or bundle.default_resolution
    height = height or bundle.default_resolution
    g = bundle.pixel_granularity
    for label, v in (("width", width), ("height", height)):
        if v % g or v <= 0:
            raise ValueError(f"{label}: {v} is not a positive multiple of {g} px, which this model needs; "
                             f"try {max(g, round(v / g) * g)}")
    if steps < 1 or n < 1:
        raise ValueError(f"steps and n must be at least 1 (got steps={steps}, n={n})")
    pipe = make_pipeline(bundle, scheduler)
    pipe.set_progress_bar_config(disable=not progress)

    def on_step_end(p, i, t, kwargs):
        if should_stop is not None and should_stop():
            p._interrupt = True
        return kwargs

    generator = torch.Generator().manual_seed(seed)
    ctx = injected(bundle, concepts) if concepts is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx, applied(bundle, weights, weight_scale):
        # Encoded here, not by the pipeline: its tokenizer does not know `[vN]` (nothing is registered).
        cond, uncond = encode_text(bundle, [prompt]), encode_text(bundle, [negative])
        embeds = {"prompt_embeds": cond.hidden.to(bundle.dtype), "negative_prompt_embeds": uncond.hidden.to(bundle.dtype)}
        if bundle.is_xl:
            if not negative.strip():  # SDXL base's force_zeros_for_empty_prompt: no negative is zeros
                uncond = type(uncond)(uncond.ids, torch.zeros_like(uncond.hidden), torch.zeros_like(uncond.pooled))
                embeds["negative_prompt_embeds"] = uncond.hidden.to(bundle.dtype)
            embeds.update(pooled_prompt_embeds=cond.pooled.to(bundle.dtype),
                          negative_pooled_prompt_embeds=uncond.pooled.to(bundle.dtype))
        result = pipe(
            **embeds, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
            num_images_per_prompt=n, generator=generator, output_type="pil", callback_on_step_end=on_step_end,
        )
    return result.images
