"""How closely an averaged cross-attention map over N timesteps matches the map it estimates (issue 6).

A mask refresh averages each concept's cross-attention map over random timesteps (with random
noise); the average is an estimate of the map's expectation. This measures the estimate's error for
N timesteps drawn independently (the paper: 50) and stratified (one random timestep in each of N
equal slices of the schedule), against a 400-timestep stratified reference, over the tiny world's
held-out evaluation scenes, with the concepts' tokens at their init words and after token steps:

    relative squared error = sum (estimate - reference)^2 / sum (reference - its mean)^2

averaged over scenes and repeated draws. A refresh with fewer timesteps keeps the results the same
when its error is no larger than the paper's 50 independent timesteps.

    python benchmarks/mask_estimate_error.py --json benchmarks/results_mask_estimate_error.json
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from em_core.atomic import write_json
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.tiny_world.evaluate import concept_task, eval_set
from em_core.masks import attention_maps
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance

ROOT = Path(__file__).resolve().parents[1]


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    spread = ((reference - reference.mean((1, 2), keepdim=True)) ** 2).sum()
    return float(((estimate - reference) ** 2).sum() / spread)


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "em_core" / "tiny_world" / "model"))
    ap.add_argument("--scenes", type=int, default=30)
    ap.add_argument("--draws", type=int, default=4, help="repeated estimates per scene and setting")
    ap.add_argument("--reference", type=int, default=400, help="timesteps of the reference map")
    ap.add_argument("--stratified", default="20,25,30,40,50")
    ap.add_argument("--uniform", default="30,50")
    ap.add_argument("--token-steps", type=int, default=100, help="token steps before the second measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    bundle = load_bundle(args.model)
    settings = [("uniform", int(n)) for n in args.uniform.split(",")] + \
               [("stratified", int(n)) for n in args.stratified.split(",")]
    errors = {when: {f"{kind} {n}": [] for kind, n in settings} for when in ("init", "trained")}
    t0 = time.time()
    tmp = Path("/tmp/em_core_mask_error")
    tmp.mkdir(exist_ok=True)
    for k, scene in enumerate(eval_set(args.scenes)):
        prompt, init, _, _ = concept_task(scene)
        path = tmp / f"scene{k:02d}.png"
        scene.image.save(path)
        img = prepare_image(bundle, path, prompt)
        state = start_state(bundle, [img], LearnConfig(steps=args.token_steps, refresh_every=0, save_every=10 ** 9), init)
        trained = learn(bundle, [img], state, progress=False).concepts
        for when, concepts in (("init", state.concepts), ("trained", trained)):
            ref = attention_maps(bundle, concepts, img, args.reference, 50, torch.Generator().manual_seed(99))
            for kind, n in settings:
                for d in range(args.draws):
                    est = attention_maps(bundle, concepts, img, n, 50, torch.Generator().manual_seed(1000 * k + d),
                                         stratified=kind == "stratified")
                    errors[when][f"{kind} {n}"].append(relative_error(est, ref))
        print(f"scene {k + 1}/{args.scenes} ({time.time() - t0:.0f} s)", flush=True)
    table = {when: {name: {"mean": float(np.mean(v)), "median": float(np.median(v))} for name, v in rows.items()}
             for when, rows in errors.items()}
    print(f"\nrelative squared error against a {args.reference}-timestep map, {args.scenes} scenes x {args.draws} draws")
    print(f"{'timesteps':<16}{'tokens at init':>16}{'after ' + str(args.token_steps) + ' steps':>18}")
    for name in table["init"]:
        print(f"{name:<16}{table['init'][name]['mean']:>16.4f}{table['trained'][name]['mean']:>18.4f}")
    if args.json:
        write_json(Path(args.json), {"model": args.model, "scenes": args.scenes, "draws": args.draws,
                                     "reference": args.reference, "token_steps": args.token_steps,
                                     "seconds": round(time.time() - t0), "errors": table,
                                     **provenance(config=vars(args))})


if __name__ == "__main__":
    main()
