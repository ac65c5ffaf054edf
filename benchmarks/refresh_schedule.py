"""How often to re-estimate the masks (issue 15, part 4): whole `learn` runs on held-out tiny-world
scenes under several refresh schedules, each run's time against the same number of plain steps (one timed
after each of the run's steps, as speed.py's whole runs are), and the final masks' IoU against
the true masks, scored as the evaluation scores them (interchangeable concepts under their best
matching), per refresh and at the end.

The default model is the research world of issue 14 (research/tiny_world_binding), whose words
bind to their objects; on the shipped tiny world every refresh moved masks away from the truth, so
it could not judge a schedule.

The runs of one scene share their seed, so their steps draw the same images, subsets, timesteps
and noise; they differ only in the masks the schedule gives. Prints a table and writes JSON.

    python benchmarks/refresh_schedule.py --scenes 6 --json benchmarks/results_refresh_schedule_research_world.json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.atomic import write_json
from em_core.metrics import mean_iou_curve
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.evaluate import concept_task, eval_set, interchangeable
from speed import interleaved_run  # a run with a plain step timed after each of its steps (this folder)

ROOT = Path(__file__).resolve().parents[1]
# name: (refresh every N steps, timesteps per refresh); 0 = the paper's baseline, masks estimated once
SCHEDULES = {"every 50 (default)": (50, 30), "every 25": (25, 30), "every 10": (10, 30), "every 1": (1, 30),
             "never (baseline)": (0, 30)}


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "research" / "tiny_world_binding"))
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    rows = {name: {"iou": [], "ratio": [], "seconds": [], "curves": []} for name in SCHEDULES}
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory()
    for k, scene in enumerate(eval_set(args.scenes)):
        prompt, init, truth, info = concept_task(scene)
        path = Path(tmp.name) / f"scene{k}.png"
        scene.image.save(path)
        img = prepare_image(bundle, path, prompt)
        groups = interchangeable(init, list(info), False)
        for name, (every, ts) in SCHEDULES.items():
            cfg = LearnConfig(steps=args.steps, refresh_every=every, refresh_timesteps=ts, save_every=10 ** 9)
            run_s, plain_s, state = interleaved_run(bundle, img, cfg, init)
            means = mean_iou_curve(state, {(0, n): m for n, m in truth.items()}, groups)
            rows[name]["iou"].append(means[-1][1])
            rows[name]["curves"].append(means)
            rows[name]["ratio"].append(run_s / plain_s)
            rows[name]["seconds"].append(run_s)
        if args.json:  # after each scene, so a run cut short keeps what it measured
            write_json(Path(args.json), {"partial": True, "scenes_done": k + 1, "rows": rows,
                                         **provenance(config=dict(model=args.model, scenes=args.scenes,
                                                                  steps=args.steps, schedules=SCHEDULES))})
        print(f"scene {k + 1}/{args.scenes}: " + "  ".join(
            f"{n.split(' (')[0]} {r['iou'][-1]:.3f}/{r['ratio'][-1]:.3f}x" for n, r in rows.items()), flush=True)
    ref = rows[next(iter(SCHEDULES))]["iou"]
    summary = {}
    for name, r in rows.items():
        diff = [a - b for a, b in zip(r["iou"], ref)]
        summary[name] = {"mask_iou": statistics.mean(r["iou"]), "ratio_median": statistics.median(r["ratio"]),
                         "curve": [(r["curves"][0][i][0], statistics.mean(c[i][1] for c in r["curves"]))
                                   for i in range(len(r["curves"][0]))],
                         "better_same_worse_than_default": [sum(d > 1e-9 for d in diff), sum(abs(d) <= 1e-9 for d in diff),
                                                            sum(d < -1e-9 for d in diff)]}
    print(f"\n{args.scenes} held-out scenes, {args.steps} steps")
    print(f"{'schedule':<34} {'mask IoU':>8} {'run / plain':>11}  better/same/worse than default")
    for name, s in summary.items():
        b, same, w = s["better_same_worse_than_default"]
        print(f"{name:<34} {s['mask_iou']:>8.3f} {s['ratio_median']:>10.3f}x  {b}/{same}/{w}")
    if args.json:
        settings = dict(model=args.model, scenes=args.scenes, steps=args.steps, schedules=SCHEDULES,
                        seconds=round(time.time() - t0))
        write_json(Path(args.json), {"summary": summary, "rows": rows, **provenance(config=settings)})
    tmp.cleanup()


if __name__ == "__main__":
    main()
