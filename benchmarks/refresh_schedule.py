"""What a cheaper E-step costs in masks: whole `learn` runs on held-out tiny-world scenes under
several refresh schedules, each run's time against the same number of plain steps (one timed
after each of the run's steps, as speed.py's whole runs are), and the final masks' IoU against
the true masks.

The runs of one scene share their seed, so their steps draw the same images, subsets, timesteps
and noise; they differ only in the masks the schedule gives. Prints a table and writes JSON.

    python benchmarks/refresh_schedule.py --scenes 12 --json benchmarks/results_refresh_schedule_tiny_world.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.tiny_world.evaluate import concept_task, eval_set
from em_core.metrics import iou_curve
from em_core.model_io import load_bundle
from speed import interleaved_run  # a run with a plain step timed after each of its steps (this folder)

ROOT = Path(__file__).resolve().parents[1]
# name: (refresh every N steps, timesteps per refresh); 0 = the paper's baseline, masks estimated once
SCHEDULES = {"every 50, 30 timesteps (default)": (50, 30), "every 50, 10 timesteps": (50, 10),
             "every 100, 30 timesteps": (100, 30), "never (baseline)": (0, 30)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "em_core" / "tiny_world" / "model"))
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    rows = {name: {"iou": [], "ratio": []} for name in SCHEDULES}
    for k, scene in enumerate(eval_set(args.scenes)):
        prompt, init, truth, _ = concept_task(scene)
        path = Path("/tmp") / f"em_core_schedule_scene{k}.png"
        scene.image.save(path)
        img = prepare_image(bundle, path, prompt)
        for name, (every, ts) in SCHEDULES.items():
            cfg = LearnConfig(steps=args.steps, refresh_every=every, refresh_timesteps=ts, save_every=10 ** 9)
            run_s, plain_s, state = interleaved_run(bundle, img, cfg, init)
            last = iou_curve(state, {(0, n): m for n, m in truth.items()})[-1]
            rows[name]["iou"].append(float(np.mean(list(last["iou"]["img1"].values()))))
            rows[name]["ratio"].append(run_s / plain_s)
        print(f"scene {k + 1}/{args.scenes}: " + "  ".join(
            f"{n.split(' (')[0]} {r['iou'][-1]:.3f}/{r['ratio'][-1]:.3f}x" for n, r in rows.items()), flush=True)
    ref = rows[next(iter(SCHEDULES))]["iou"]
    summary = {}
    for name, r in rows.items():
        diff = [a - b for a, b in zip(r["iou"], ref)]
        summary[name] = {"mask_iou": statistics.mean(r["iou"]), "ratio_median": statistics.median(r["ratio"]),
                         "better_same_worse_than_default": [sum(d > 1e-9 for d in diff), sum(abs(d) <= 1e-9 for d in diff),
                                                            sum(d < -1e-9 for d in diff)]}
    print(f"\n{args.scenes} held-out scenes, {args.steps} steps")
    print(f"{'schedule':<34} {'mask IoU':>8} {'run / plain':>11}  better/same/worse than default")
    for name, s in summary.items():
        b, same, w = s["better_same_worse_than_default"]
        print(f"{name:<34} {s['mask_iou']:>8.3f} {s['ratio_median']:>10.3f}x  {b}/{same}/{w}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "scenes": args.scenes, "steps": args.steps,
                                               "schedules": SCHEDULES, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
