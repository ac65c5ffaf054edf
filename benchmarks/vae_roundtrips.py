"""What a world's checker reads, shape by shape, from its VAE's round trips of fresh single-object
renders: the ceiling of what any denoiser on that VAE's latents can show of a shape (issue 14,
gate 3: a VAE trained on the named shapes only turns stars into crosses one time in five).

    python benchmarks/vae_roundtrips.py --model research/tiny_world_unnamed [--model OTHER ...] [--json FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from em_core.atomic import write_json
from em_core.provenance import begin, provenance


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", required=True, help="tiny world folders (each with vae/ and its checker)")
    ap.add_argument("--images", type=int, default=512, help="round trips read (the world card's renders)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from em_core.tiny_world.decoder_tune import load_world_vae, roundtrip_by_shape

    res = {"images": args.images, "models": {}}
    for model in args.model:
        try:
            vae, checker = load_world_vae(model)
        except ValueError as exc:
            raise SystemExit(f"--{exc}") from None
        read = roundtrip_by_shape(vae, checker, args.images)
        res["models"][model] = read
        print(model)
        for shape, r in read.items():
            print(f"  {shape:9s} right {r['right']:.3f} of {r['n']:3d}  read as {r['read']}")
    if args.json:
        res.update(provenance(config=vars(args)))
        write_json(Path(args.json), res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
