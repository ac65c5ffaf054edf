"""Speed of the EM machinery against its floor (issue 6; a first cut, CPU).

Prints a table and writes JSON:
- one EM token step (attention capture + attention loss) vs a plain masked-loss step with the
  U-Net's own fused attention, same model, image and draws;
- a whole EM run (mask refreshes and DenseCRF included) vs the same number of plain steps;
- mask init over 50 timesteps batched vs one by one (and the largest difference of the maps);
- DenseCRF at 512x512 with 4 labels.

    python benchmarks/speed.py [--model em_core/models/tiny_world] [--steps 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from em_core.attention import AttentionCapture
from em_core.config import LearnConfig
from em_core.crf import refine_masks
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.losses import masked_diffusion_loss
from em_core.masks import attention_maps, latent_masks
from em_core.model import load_bundle
from em_core.scenes import random_scene
from em_core.training import concept_step_loss

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "em_core" / "models" / "tiny_world"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bundle = load_bundle(args.model)
    scene = random_scene(3, n_objects=2)
    path = Path("/tmp") / "em_core_bench_scene.png"
    scene.image.save(path)
    img = prepare_image(bundle, path, "a photo of [v1] and [v2] on [v3]")
    state = learn(bundle, [img], start_state(bundle, [img], LearnConfig(steps=0, mask_timesteps=10)),
                  progress=False)
    cs = state.concepts
    vec = torch.nn.Parameter(cs.vectors.clone())
    lat = [latent_masks(state.masks[0], img.latent_hw)]
    ids = dict(zip(cs.names, cs.token_ids(bundle.tokenizer)))
    rows = {}

    with torch.enable_grad(), AttentionCapture(bundle.unet) as cap:
        def em_step():
            loss, _ = concept_step_loss(bundle, [img], cs, vec, lat, ids, 0, 0, False, 1e-2, cap)
            loss.backward()
        t_em = _timed(em_step, args.steps)

    def plain_step():
        from em_core.concepts import encode_prompts, injected
        z = img.sample_latent(False, torch.Generator().manual_seed(0))
        noise = torch.randn_like(z)
        t = torch.tensor([500])
        with injected(bundle, cs, vec):
            _, hidden = encode_prompts(bundle, ["a photo of [v1] and [v3]"])
        pred = bundle.unet(bundle.scheduler.add_noise(z, noise, t), t, encoder_hidden_states=hidden).sample
        masked_diffusion_loss(pred, noise, lat[0][:1].amax(0, keepdim=True)[None]).backward()

    with torch.enable_grad():
        t_plain = _timed(plain_step, args.steps)
    rows["em_step_vs_plain"] = {"em_s": t_em, "plain_s": t_plain, "ratio": t_em / t_plain}

    cfg = LearnConfig(steps=args.steps, refresh_every=max(1, args.steps // 4), mask_timesteps=50, save_every=10**9)
    t0 = time.perf_counter()
    learn(bundle, [img], start_state(bundle, [img], cfg), progress=False)
    t_run = time.perf_counter() - t0
    rows["em_run_vs_plain_steps"] = {"em_run_s": t_run, "plain_steps_s": t_plain * args.steps,
                                     "ratio": t_run / (t_plain * args.steps)}

    with torch.no_grad():
        t0 = time.perf_counter()
        loop = attention_maps(bundle, cs, img, 50, 1, torch.Generator().manual_seed(1))
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = attention_maps(bundle, cs, img, 50, 50, torch.Generator().manual_seed(1))
        t_batch = time.perf_counter() - t0
    rows["mask_init_batched_vs_loop"] = {"batched_s": t_batch, "loop_s": t_loop, "ratio": t_batch / t_loop,
                                         "max_abs_diff": float((loop - batched).abs().max())}

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    masks = np.zeros((4, 512, 512), bool)
    for k in range(4):
        masks[k, 128 * k:128 * k + 160, 100:400] = True
    t0 = time.perf_counter()
    refine_masks(rgb, masks)
    rows["densecrf_512_4_labels"] = {"seconds": time.perf_counter() - t0}

    print(f"model: {args.model}  torch threads: {torch.get_num_threads()}  steps: {args.steps}")
    for name, r in rows.items():
        print(f"{name:<28} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
