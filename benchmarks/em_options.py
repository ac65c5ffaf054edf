"""What each of EM's mask options does to the masks (issue 14, part 5): whole `learn` runs on
held-out tiny-world scenes (`evaluate.eval_set`, the evaluation's scenes, prompts and init words)
under several LearnConfig variants, scored per refresh against the true masks as the evaluation
scores them (interchangeable concepts under their best matching).

The runs of one scene share their seed, so they draw the same images, subsets, timesteps and
noise; they differ only in the option. Prints a table and, with --json, writes JSON with the
command, commit and machine.

    python benchmarks/em_options.py --model research/tiny_world_binding --scenes 8 \
        --variants baseline em sticky=mask_stickiness:0.3 --json runs/em_options.json

A variant is `baseline` (masks estimated once), `em` (the defaults) or `NAME=KEY:VALUE[,KEY:VALUE]`,
LearnConfig fields over EM's defaults, values read as JSON (`t600=mask_t_range:[0,600]`);
`background:"last"` names each scene's background concept (its last, as `concept_task` orders them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.atomic import write_json
from em_core.metrics import mean_iou_curve
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.evaluate import concept_task, eval_set, interchangeable

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, dict]:
    """`baseline` / `em` / `NAME=KEY:VALUE,...` -> (name, LearnConfig overrides)."""
    if text == "baseline":
        return text, {"refresh_every": 0}
    if text == "em":
        return text, {}
    name, sep, body = text.partition("=")
    if not sep or not body:
        raise SystemExit(f"--variants: {text!r} is not baseline, em or NAME=KEY:VALUE[,KEY:VALUE]")
    overrides = {}
    for part in _split_top(body):
        key, sep, value = part.partition(":")
        if not sep or key not in LearnConfig.__dataclass_fields__:
            raise SystemExit(f"--variants: {part!r} in {text!r} is not KEY:VALUE with KEY a LearnConfig field")
        value = json.loads(value)
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return name, overrides


def _split_top(body: str) -> list[str]:
    """Split on commas outside brackets, so `mask_t_range:[0,600]` stays one part."""
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def scene_arguments() -> argparse.ArgumentParser:
    """The model and the slice of the evaluation's held-out scenes, as the tiny-world benchmarks take them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "research" / "tiny_world_binding"))
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--first", type=int, default=0, help="index of the first scene of eval_set")
    return ap


def held_out_images(bundle, first: int, n: int):
    """(index, scene, init words, true masks, object facts, prepared image) for scenes first.. of the
    evaluation's held-out set, each image written to a temporary folder while it is in use."""
    with tempfile.TemporaryDirectory() as tmp:
        for k, scene in enumerate(eval_set(first + n)[first:], start=first):
            prompt, init, truth, info = concept_task(scene)
            path = Path(tmp) / f"scene{k}.png"
            scene.image.save(path)
            yield k, scene, init, truth, info, prepare_image(bundle, path, prompt)


def main() -> None:
    begin()
    ap = scene_arguments()
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument("--refresh", type=int, default=LearnConfig.refresh_every)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["baseline", "em"])
    ap.add_argument("--random-init", action="store_true",
                    help="every token starts at random, its object concepts scored under their best matching")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in args.variants)
    for name, over in variants.items():  # bad values fail here, before any run
        LearnConfig(**{"steps": args.steps, "refresh_every": args.refresh, **over})
    bundle = load_bundle(args.model)
    rows = {name: {"iou": [], "curves": []} for name in variants}
    t0 = time.time()
    for k, scene, init, truth, info, img in held_out_images(bundle, args.first, args.scenes):
        groups = interchangeable(init, list(info), args.random_init)
        for name, over in variants.items():
            cfg = LearnConfig(**{"steps": args.steps, "refresh_every": args.refresh, "seed": args.seed,
                                 "save_every": 10 ** 9, "background": img.names[-1]
                                 if over.get("background") == "last" else None,
                                 **{k2: v for k2, v in over.items() if k2 != "background"}})
            state = learn(bundle, [img], start_state(bundle, [img], cfg, {} if args.random_init else init),
                          progress=False)
            means = mean_iou_curve(state, {(0, n): m for n, m in truth.items()}, groups)
            rows[name]["iou"].append(means[-1][1])
            rows[name]["curves"].append(means)
        print(f"scene {k} ({time.time() - t0:.0f}s): " + "  ".join(
            f"{n} {r['iou'][-1]:.3f}" for n, r in rows.items()), flush=True)
    summary = {name: {"mask_iou": statistics.mean(r["iou"]), "per_scene": r["iou"],
                      "curve": [statistics.mean(c[i][1] for c in r["curves"]) for i in range(len(r["curves"][0]))],
                      "curve_steps": [s for s, _ in r["curves"][0]], "overrides": variants[name]}
               for name, r in rows.items()}
    print(f"\n{'variant':<16} mean IoU  per refresh")
    for name, s in summary.items():
        print(f"{name:<16} {s['mask_iou']:.3f}     " + " ".join(f"{v:.3f}" for v in s["curve"]))
    if args.json:
        settings = dict(model=args.model, scenes=args.scenes, first=args.first, steps=args.steps,
                        refresh=args.refresh, seed=args.seed, random_init=args.random_init, seconds=round(time.time() - t0))
        write_json(args.json, {"summary": summary, **provenance(config=settings)})


if __name__ == "__main__":
    main()
