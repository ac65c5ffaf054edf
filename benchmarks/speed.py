"""Speed of the EM machinery against its floor (issue 6).

Prints a table and writes JSON. Each ratio is measured in one run, same machine and model:
- em_step: one EM token step (attention capture + attention loss, backward, AdamW) / the plain
  masked-loss step of the same draws with the U-Net's own fused attention;
- em_run: whole `learn` runs (first mask estimate, refreshes with DenseCRF, all steps) / the same
  number of plain steps, one timed after each of the run's steps so that the machine's drift
  weighs on both, `--run-repeats` times (lower median); `--run-steps` steps, refresh
  every `--refresh` steps, each refresh fresh U-Net passes over
  `--refresh-timesteps`; plus a refresh timed alone and the ratio
  of a `--project` run (default 400 steps, refresh every 50) from the measured parts;
- mask_init: 50 timesteps in batched calls (the runs' `mask_batch`) that stop after the last
  captured layer / the straightforward one-by-one loop over full U-Net calls (plus the two halves
  of that gain apart), and the largest difference of the maps;
- densecrf: DenseCRF at 512x512 with 4 labels, at full size (the default) and at a 256 px working side;
- text_side: a step's text side (concept injection + prompt encoding, forward), every step's
  host work besides the U-Net;
- maps_pass: the GFLOP of one maps-only U-Net call, and the share of it spent projecting the
  prompt into keys and values (identical for every item of a batch).

em_run's `split` says where the run's time beyond its plain steps went, from times taken inside
the run: its first estimate, its refreshes, and the rest, its token steps' extra (capture +
attention loss, the loop's bookkeeping, `learn`'s set-up), each as a share of the plain steps'
time (they add up to ratio - 1).
`--device cuda --dtype fp16` runs it on a GPU (timings synchronise the device).

    python benchmarks/speed.py                                  # shipped tiny-world model, 64 px
    python benchmarks/speed.py --model sd15 --size 256 --run-steps 8 --refresh 4   # SD-1.5-shaped, random
    python benchmarks/speed.py --model SD_FOLDER --size 512 --device cuda --dtype fp16       # on a GPU
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from em_core.atomic import write_json
from em_core.attention import AttentionCapture, concept_selector
from em_core.concepts import ConceptSet, encode_prompts, injected
from em_core.config import LearnConfig
from em_core.crf import CRFParams, refine_masks
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.masks import attention_maps, estimate_masks, latent_masks
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.scenes import random_scene
from em_core.training import concept_step_loss

ROOT = Path(__file__).resolve().parents[1]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bundle(name: str, device: str = "cpu", dtype: str = "fp32"):
    if name in ("sd15", "sdxl", "tiny_xl"):  # random weights of those shapes
        from em_core.tiny_world.tiny_model import build_model

        return build_model(name, seed=0).to(device, DTYPES[dtype])
    return load_bundle(name, device=device, dtype=DTYPES[dtype])


SYNC: list = [None]  # the CUDA device the timings wait for (set from --device), or None


def clock() -> float:
    """perf_counter after the GPU's queued work is done, so a timing covers the work, not its launch."""
    if SYNC[0] is not None:
        torch.cuda.synchronize(SYNC[0])
    return time.perf_counter()


def _step_timer(bundle, img, concepts, latent):
    """A closure timing n token steps (forward, backward, AdamW) from step `first`, with a capture
    (EM) or without (plain: the U-Net's own processors)."""
    vec = torch.nn.Parameter(concepts.vectors.clone().float().to(bundle.device))
    opt = torch.optim.AdamW([vec], lr=5e-4)
    ids = dict(zip(concepts.names, concepts.token_ids(bundle)))

    def steps(first: int, n: int, capture) -> float:
        t0 = clock()
        for s in range(first, first + n):
            loss, _ = concept_step_loss(bundle, [img], concepts, vec, [latent], ids, s, 0, True, 1e-2, capture)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (clock() - t0) / n

    def run(first: int, n: int, em: bool) -> float:
        with torch.enable_grad():
            if not em:
                return steps(first, n, None)
            with AttentionCapture(bundle.unet) as cap:
                return steps(first, n, cap)

    return run


def _plain_timer(bundle, img, state):
    """A step timer on a run's tokens and first image's masks, past its warm-up step (the
    optimiser's first step, not counted)."""
    plain = _step_timer(bundle, img, state.concepts, latent_masks(state.masks[0], img.latent_hw))
    plain(0, 1, False)
    return plain


def plain_steps_s(bundle, img, state, steps: int) -> float:
    """Seconds of `steps` plain steps (after one warm-up) with a finished run's tokens and masks."""
    return _plain_timer(bundle, img, state)(0, steps, False) * steps


def bench_steps(bundle, img, concepts, latent, rounds: int, per_round: int) -> dict:
    """Interleaved rounds of EM and plain steps over the same draws; medians per step."""
    em_t, plain_t = [], []
    em, plain = _step_timer(bundle, img, concepts, latent), _step_timer(bundle, img, concepts, latent)
    em(0, 1, True), plain(0, 1, False)  # warm-up
    for r in range(rounds):
        first = 1 + r * per_round
        em_t.append(em(first, per_round, True))
        plain_t.append(plain(first, per_round, False))
    e, p = statistics.median(em_t), statistics.median(plain_t)
    return {"em_step_s": e, "plain_step_s": p, "ratio": e / p, "rounds": rounds, "steps_per_round": per_round}


def interleaved_run(bundle, img, cfg: LearnConfig, init_words: dict | None = None):
    """One `learn` run with a plain step timed after each of its steps, so a drift of the machine's
    speed during the run weighs on both alike. Returns (the run's seconds less the plain steps,
    the plain steps' seconds, the finished state). The plain steps run with the U-Net's own
    processors and their own copy of the tokens and optimiser, on the first estimate's masks
    (what a step costs does not depend on their values); the run's own draws are unchanged."""
    if cfg.warmup_steps:
        raise ValueError("interleaved_run: warm-up steps have no masks to time plain steps on; use warmup_steps=0")
    plain = {"timer": None, "s": 0.0, "spent": 0.0}

    def on_step(state, info):
        t0 = clock()
        procs = bundle.unet.attn_processors  # the run's capture processors, put back after
        bundle.unet.set_attn_processor({n: getattr(p, "original", p) for n, p in procs.items()})
        try:
            if plain["timer"] is None:
                plain["timer"] = _plain_timer(bundle, img, state)
            plain["s"] += plain["timer"](info["step"], 1, False)
        finally:
            bundle.unet.set_attn_processor(procs)
        plain["spent"] += clock() - t0

    t0 = clock()
    done = learn(bundle, [img], start_state(bundle, [img], cfg, init_words), progress=False, on_step=on_step)
    return clock() - t0 - plain["spent"], plain["s"], done


def bench_run(bundle, img, steps: int, refresh: int, timesteps: int,
              refresh_timesteps: int = LearnConfig.refresh_timesteps, repeats: int = 3) -> dict:
    """Whole runs against as many plain steps interleaved with them, `repeats` times; median ratio.

    `split` divides the chosen run's time beyond its plain steps into its first estimate and its
    refreshes, each timed inside the run (the refresh records' `seconds`), and the rest, named
    token steps' extra: capture + attention loss, the loop's bookkeeping, and `learn`'s own set-up;
    as shares of the plain steps' time, the three add up to ratio - 1.
    """
    cfg = LearnConfig(steps=steps, refresh_every=refresh, mask_timesteps=timesteps, save_every=10 ** 9,
                      refresh_timesteps=refresh_timesteps)
    runs, plains, done = [], [], []
    for _ in range(repeats):
        run_s, plain_s, state = interleaved_run(bundle, img, cfg)
        runs.append(run_s)
        plains.append(plain_s)
        done.append(state)
    t0 = clock()  # the first estimate alone: a run of no steps
    learn(bundle, [img], start_state(bundle, [img], LearnConfig(steps=0, mask_timesteps=timesteps)), progress=False)
    t_init = clock() - t0
    t0 = clock()  # one refresh alone: new maps with the learned tokens, threshold, DenseCRF
    estimate_masks(bundle, done[-1].concepts, img, n_timesteps=refresh_timesteps, batch=cfg.mask_batch,
                   generator=torch.Generator().manual_seed(2))
    t_refresh = clock() - t0
    ratios = [r / p for r, p in zip(runs, plains)]
    k = ratios.index(statistics.median_low(ratios))
    records = done[k].history["refreshes"]
    init_s = sum(r["seconds"] for r in records if r["kind"] == "init")
    refreshes_s = sum(r["seconds"] for r in records if r["kind"] != "init")
    steps_s = runs[k] - init_s - refreshes_s
    split = {"token_steps": steps_s / plains[k] - 1, "first_estimate": init_s / plains[k],
             "refreshes": refreshes_s / plains[k]}
    return {"em_run_s": runs[k], "plain_steps_s": plains[k], "ratio": ratios[k], "ratios": ratios,
            "split": split, "in_run_s": {"token_steps": steps_s, "first_estimate": init_s, "refreshes": refreshes_s},
            "first_estimate_s": t_init, "refresh_s": t_refresh, "steps": steps,
            "refresh_every": refresh, "refresh_timesteps": refresh_timesteps,
            "refreshes": len(records) - 1}


def bench_mask_init(bundle, img, concepts, timesteps: int, repeats: int = 1, batches=()) -> dict:
    def timed(batch, stop):
        best, maps = float("inf"), None
        for _ in range(repeats):  # the fastest of `repeats`: this machine's timings wander
            gen = torch.Generator().manual_seed(1)
            t0 = clock()
            maps = attention_maps(bundle, concepts, img, timesteps, batch, gen, stop_early=stop)
            best = min(best, clock() - t0)
        return best, maps

    batch = LearnConfig.mask_batch  # what a run uses
    with torch.no_grad():
        timed(batch, True)  # warm-up
        t_loop, loop = timed(1, False)
        t_loop_stop, _ = timed(1, True)
        t_batch_full, _ = timed(batch, False)
        t_batch, batched = timed(batch, True)
        # Other batch sizes: where batching stops paying, the calls are at the model's compute floor.
        other = {str(n): timed(n, True)[0] for n in batches}
    return {"batched_stop_s": t_batch, "loop_full_s": t_loop, "ratio": t_batch / t_loop, "batch": batch,
            "batching_alone": t_batch_full / t_loop, "stop_early_alone": t_loop_stop / t_loop,
            "max_abs_diff": float((loop - batched).abs().max()), "timesteps": timesteps, "repeats": repeats,
            "other_batches_s": other}


def bench_crf(img, own_masks) -> dict:
    """DenseCRF on a 512x512 noise image with 4 labels, at full size and at the default working
    side; and on this benchmark's image with its own masks."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    masks = np.zeros((4, 512, 512), bool)
    for k in range(4):
        masks[k, 128 * k:128 * k + 160, 100:400] = True
    out = {}
    for key, params in (("crf_512_4_labels_full_s", CRFParams(max_side=None)),
                        ("crf_512_4_labels_side256_s", CRFParams(max_side=256))):
        t0 = clock()
        refine_masks(rgb, masks, params)
        out[key] = clock() - t0
    t0 = clock()
    refine_masks(img.rgb, own_masks)
    out["crf_this_image_s"] = clock() - t0
    out["this_image"] = list(img.size)
    return out


def bench_maps_pass(bundle, img, concepts) -> dict:
    """Floating-point work of one maps-only U-Net call (one timestep, stopping after the last
    captured layer), and the share of it that projects the prompt into each cross-attention
    layer's keys and values: the same for every item of a batched call."""
    from torch.utils.flop_counter import FlopCounterMode

    with injected(bundle, concepts):
        ids, hidden = encode_prompts(bundle, [img.prompt])
    select = concept_selector(ids, concepts.token_ids(bundle))
    noisy = img.latent_mean[0:1].to(bundle.device, bundle.dtype)
    t = torch.tensor([500], device=bundle.device)
    text_kv = {}

    def count(name):
        def hook(module, args, out):
            text_kv[name] = 2 * out.numel() * args[0].shape[-1]  # one multiply-add per weight use
        return hook

    handles = [m.register_forward_hook(count(f"{n}.{w}")) for n, a in bundle.unet.named_modules()
               if n.endswith("attn2") for w, m in (("k", a.to_k), ("v", a.to_v))]
    try:
        with torch.no_grad(), AttentionCapture(bundle.unet, stop_early=True) as cap, \
                FlopCounterMode(display=False) as fc:
            cap.run(select, img.latent_hw, lambda: bundle.unet(noisy, t, encoder_hidden_states=hidden).sample)
    finally:
        for h in handles:
            h.remove()
    total, kv = fc.get_total_flops(), sum(text_kv.values())
    return {"gflop": total / 1e9, "text_kv_gflop": kv / 1e9, "text_kv_share": kv / total}


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def bench_text_side(bundle, concepts, repeats: int = 50) -> dict:
    vec = torch.nn.Parameter(concepts.vectors.clone().float().to(bundle.device))
    prompt = "a photo of " + " and ".join(concepts.names)
    times = []
    with torch.enable_grad():
        for _ in range(repeats):
            t0 = clock()
            with injected(bundle, concepts, vec):
                encode_prompts(bundle, [prompt])
            times.append(clock() - t0)
    return {"text_side_s": statistics.median(times), "repeats": repeats}


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "em_core" / "tiny_world" / "model"),
                    help="a diffusers folder, or 'sd15' / 'sdxl' for an SD-1.5- / SDXL-shaped model with random "
                         "weights ('tiny_xl': the tests' tiny SDXL)")
    ap.add_argument("--size", type=int, default=None, help="working side in pixels (default: the model's)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--run-repeats", type=_positive, default=3, help="whole runs (each against its plain steps)")
    ap.add_argument("--mask-repeats", type=_positive, default=5, help="timings of each mask-init variant (fastest kept)")
    ap.add_argument("--mask-batches", type=int, nargs="*", default=[],
                    help="also time mask init at these batch sizes (stopping early)")
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--run-steps", type=int, default=400)
    ap.add_argument("--refresh", type=int, default=50)
    ap.add_argument("--timesteps", type=int, default=50, help="of the first mask estimate, and of mask_init")
    ap.add_argument("--refresh-timesteps", type=int, default=LearnConfig.refresh_timesteps)
    ap.add_argument("--project", type=int, nargs=2, default=(400, 50), metavar=("STEPS", "EVERY"),
                    help="also give the whole-run ratio of this many steps refreshed this often, from the measured "
                         "step, first estimate and refresh times")
    ap.add_argument("--only", nargs="*", default=None, help="em_step em_run mask_init densecrf text_side maps_pass")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's weights (fp16/bf16: GPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bundle = _bundle(args.model, args.device, args.dtype)
    SYNC[0] = bundle.device if bundle.device.type == "cuda" else None
    scene = random_scene(3, size=max(64, args.size or 64), n_objects=2)
    path = Path("/tmp") / "em_core_bench_scene.png"
    scene.image.save(path)
    img = prepare_image(bundle, path, "a photo of [v1] and [v2] on [v3]", args.size)
    concepts = ConceptSet.create(bundle, img.names, seed=0)
    masks, _ = estimate_masks(bundle, concepts, img, n_timesteps=4, batch=4)
    latent = latent_masks(masks, img.latent_hw)
    only = set(args.only or ["em_step", "em_run", "mask_init", "densecrf", "text_side", "maps_pass"])
    rows = {}
    if "em_step" in only:
        rows["em_step"] = bench_steps(bundle, img, concepts, latent, args.rounds, args.per_round)
    if "em_run" in only:
        rows["em_run"] = bench_run(bundle, img, args.run_steps, args.refresh, args.timesteps,
                                   args.refresh_timesteps, args.run_repeats)
    # A longer run from its measured parts.
    if "em_step" in rows and "em_run" in rows:
        n, every = args.project
        step, plain, run = rows["em_step"]["em_step_s"], rows["em_step"]["plain_step_s"], rows["em_run"]
        refreshes = len(range(every, n, every))
        rows["em_run"][f"projected_ratio_{n}_steps_refresh_{every}"] = \
            (n * step + run["first_estimate_s"] + refreshes * run["refresh_s"]) / (n * plain)
    if "mask_init" in only:
        rows["mask_init"] = bench_mask_init(bundle, img, concepts, args.timesteps, args.mask_repeats,
                                              args.mask_batches)
    if "densecrf" in only:
        rows["densecrf"] = bench_crf(img, masks)
    if "text_side" in only:
        rows["text_side"] = bench_text_side(bundle, concepts)
    if "maps_pass" in only:
        rows["maps_pass"] = bench_maps_pass(bundle, img, concepts)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "device": args.device,
               "dtype": args.dtype,
               "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"model: {args.model}  image: {img.size[0]}x{img.size[1]} (latent {img.latent_hw})  {machine}")
    for name, r in rows.items():
        print(f"{name:<10} " + "  ".join(f"{k} {_fmt(v)}" for k, v in r.items()))
    if args.json:
        prov = provenance(config={k: v for k, v in vars(args).items() if k != "json"})
        write_json(Path(args.json), {"model": args.model, "size": img.size, "rows": rows, **prov,
                                     "machine": {**prov["machine"], **machine}})


if __name__ == "__main__":
    main()
