"""How much of EM's fidelity gap is the tokens' history (issue 14, gate 4): EM's tokens spend their
first refreshes on wrong masks, so tokens started afresh on EM's final masks (Break-A-Scene
stage 1 with those masks fixed, what `learn --mask` does with EM's mask PNGs) are read back
beside EM's own, on the evaluation's held-out scenes, prompts, init words, seed and read-back.

    python benchmarks/em_relearn.py --model research/tiny_world_photo --first 0 --scenes 15 \
        --method em_exclusive_fill --json runs/em_relearn_0_14.json

Each concept is read back against the object its final mask is matched to (as `evaluate`); the
relearned tokens use the same matching, since they share EM's masks. Prints the per-scene and the
read-back over all scenes and over those whose final masks EM got right and wrong; --json writes
them with the command, commit and machine; `--report JSON` prints an earlier run's summary again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from em_core.atomic import write_json
from em_core.config import LearnConfig
from em_core.em_loop import learn, start_state
from em_core.metrics import final_matching, mean_iou_curve
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.checker import load_checker
from em_core.tiny_world.evaluate import METHODS, RANDOM_INIT, _method_config, interchangeable, read_back

from em_options import held_out_images, scene_arguments


def rates(rows: list, run: str) -> dict:
    colour = [c for r in rows for c in r[run]["colour"]]
    seen = [s for r in rows for s, h in zip(r[run]["shape"], r["held_out"]) if not h]
    held = [s for r in rows for s, h in zip(r[run]["shape"], r["held_out"]) if h]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"colour": mean(colour), "shape_seen": mean(seen), "shape_held_out": mean(held), "images": len(colour)}


RIGHT = 0.95  # a scene whose EM masks end at least this close to the truth counts as "masks right"


def per_scene(res: dict, flags: list[list[bool]]) -> list[dict]:
    """One method's read-back from an `evaluate` run (flat lists in scene order, seen and held-out
    shapes kept apart) cut into scenes, given each scene's held-out flag per image."""
    colour, seen, held = iter(res["fid_colour"]), iter(res["fid_shape"]), iter(res["fid_held_out_shape"])
    return [{"colour": [next(colour) for _ in f], "shape": [next(held) if h else next(seen) for h in f]}
            for f in flags]


def with_true_masks(rows: list, partial: str) -> list:
    """Each row with the true-mask tokens' read-back of its scene, from an `evaluate` run's partial.json
    that ran `true_masks` over the same scenes from 0 with the same images per concept."""
    res = json.loads(Path(partial).read_text())["results"]["true_masks"]
    colour = res["fid_colour"]
    need = [sum(len(r["held_out"]) for r in rows), sum(not h for r in rows for h in r["held_out"])]
    if need != [len(colour), len(res["fid_shape"])]:
        raise SystemExit(f"--true-masks: {partial} holds {len(colour)} images ({len(res['fid_shape'])} of seen "
                         f"shapes), these rows {need[0]} ({need[1]})")
    rows = sorted(rows, key=lambda r: r["scene"])
    for k, r in enumerate(rows):
        if r["scene"] != k:
            raise SystemExit(f"--true-masks: the rows must be scenes 0.. in order; scene {r['scene']} is row {k}")
    return [{**r, "true_masks": cut} for r, cut in zip(rows, per_scene(res, [r["held_out"] for r in rows]))]


def summarise(rows: list) -> dict:
    """Read-back rates of both runs over all scenes, and over the scenes whose final masks EM got right
    (mean IoU >= RIGHT) and wrong: where the relearned tokens gain is where the tokens' history costs."""
    right = [r for r in rows if r["mask_iou"] >= RIGHT]
    wrong = [r for r in rows if r["mask_iou"] < RIGHT]
    runs = [run for run in ("em", "relearned", "true_masks") if rows and run in rows[0]]
    split = {part: {run: rates(sub, run) for run in runs} | {"scenes": len(sub)}
             for part, sub in (("masks_right", right), ("masks_wrong", wrong))}
    return {run: rates(rows, run) for run in runs} | {"scenes": len(rows)} | split


def show(summary: dict) -> None:
    parts = {"all": {k: v for k, v in summary.items() if not k.startswith("masks_")}}
    parts.update({k: v for k, v in summary.items() if k.startswith("masks_")})
    for part, runs in parts.items():
        print(f"{part} ({runs['scenes']} scenes)")
        for run in [r for r in runs if r != "scenes"]:
            s = runs[run]
            print(f"  {run:<10} colour {s['colour']:.3f}  shape (seen) {s['shape_seen']:.3f}  "
                  f"shape (held out) {s['shape_held_out']:.3f}  ({s['images']} images)")


def main() -> None:
    begin()
    ap = scene_arguments()
    ap.add_argument("--report", default=None, help="print the summary of an earlier run's JSON and stop")
    ap.add_argument("--true-masks", default=None,
                    help="with --report: an evaluate partial.json with true_masks over the same scenes, read back "
                         "over the same subsets")
    ap.add_argument("--method", default="em_exclusive_fill",  # relearning starts from the init words
                    choices=[m for m in METHODS if m.startswith("em") and not m.endswith(RANDOM_INIT)])
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument("--refresh", type=int, default=50)
    ap.add_argument("--gen-images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.report:
        rows = json.loads(Path(args.report).read_text())["scenes"]
        show(summarise(with_true_masks(rows, args.true_masks) if args.true_masks else rows))
        return
    bundle = load_bundle(args.model)
    checker = load_checker(Path(args.model) / "checker.safetensors")
    rows, t0 = [], time.time()
    for k, scene, init, truth, info, img in held_out_images(bundle, args.first, args.scenes):
        em_cfg = _method_config(args.method, args.steps, args.refresh, 50, args.seed)
        em = learn(bundle, [img], start_state(bundle, [img], em_cfg, init), progress=False)
        groups = interchangeable(init, list(info), False)
        true = {(0, n): m for n, m in truth.items()}
        final = {(0, n): em.masks[0][j] for j, n in enumerate(img.names) if em.masks[0][j].any()}
        re_cfg = _method_config("baseline", args.steps, args.refresh, 50, args.seed)
        again = learn(bundle, [img], start_state(bundle, [img], re_cfg, init, final), progress=False)
        match = final_matching(em, true, groups)
        row = {"scene": k, "mask_iou": mean_iou_curve(em, true, groups)[-1][1]}
        for run, state in (("em", em), ("relearned", again)):
            fid = read_back(bundle, checker, state, {n: info[match[n]] for n in info}, n=args.gen_images,
                            steps=25, guidance=4.0, seed=args.seed)
            row[run] = {"colour": [f[0] for f in fid], "shape": [f[1] for f in fid]}
            row["held_out"] = [f[2] for f in fid]
        rows.append(row)
        print(f"scene {k} ({time.time() - t0:.0f}s): mask IoU {row['mask_iou']:.3f}, colour right "
              f"EM {sum(row['em']['colour'])} relearned {sum(row['relearned']['colour'])} "
              f"of {len(row['em']['colour'])}", flush=True)
    summary = summarise(rows)
    show(summary)
    if args.json:
        settings = dict(model=args.model, scenes=args.scenes, first=args.first, method=args.method, steps=args.steps,
                        refresh=args.refresh, gen_images=args.gen_images, seed=args.seed,
                        seconds=round(time.time() - t0))
        write_json(args.json, {"summary": summary, "scenes": rows, **provenance(config=settings)})


if __name__ == "__main__":
    main()
