"""The world model's gates (issue 14): word-to-object binding of cross-attention, text use of the
denoiser, and captions read back by the checker; prints them and writes a results JSON.

    python benchmarks/world_binding.py --model em_core/tiny_world/model [--out FILE.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from em_core.atomic import write_json
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.checker import load_checker
from em_core.tiny_world.evaluate import caption_fidelity
from em_core.tiny_world.world_probe import binding, text_use


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="em_core/tiny_world/model")
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--readback", type=int, default=48, help="generated captions to read back (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    bundle = load_bundle(args.model)
    res = {"model": args.model, "binding": binding(bundle, n_scenes=args.scenes), "text_use": text_use(bundle)}
    for group, kinds in res["binding"].items():
        print(f"AUROC own vs other, {group:>4} layers: colour {kinds['colour']['mean']:.3f}  "
              f"shape {kinds['shape']['mean']:.3f}  (per t: "
              + ", ".join(f"{t}: {kinds['colour'][t]:.2f}/{kinds['shape'][t]:.2f}" for t in kinds['colour'] if isinstance(t, int))
              + ")")
    tu = res["text_use"]
    print(f"true caption vs empty prompt, fixed noise: loss drop {tu['drop_upper_half']:.3%} over t >= 500, "
          f"{tu['drop_all_t']:.3%} over all t")
    if args.readback:
        checker = load_checker(Path(args.model) / "checker.safetensors")
        res["readback"] = caption_fidelity(bundle, checker, n=args.readback, steps=30)
        print(f"captions read back: colour {res['readback']['colour']:.3f}, shape {res['readback']['shape']:.3f} "
              f"({args.readback} images)")
    res.update(provenance(config=vars(args)))
    res["seconds"] = round(time.time() - t0)
    if args.out:
        write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
