"""DenseCRF on the real photographs with human masks (../shared/data/scenes).

Each human mask is made attention-like (16x16, blurred, noisy, blown up, thresholded low),
then refined by DenseCRF with a preset's settings (default: CutLER's, the paper's choice;
`--preset deeplab` for the DeepLab-v2 set this engine used before issue 15); prints IoU against
the human mask before and after, per scene and on average, at several image sides, and the
seconds DenseCRF took per photo.

    python benchmarks/crf_real_photos.py [--sides 512 256 128] [--seed 0] [--max-side 256]
        [--preset cutler|deeplab] [--tiny-world N] [--json FILE]

With --max-side, the CRF runs at that side at most and its result is scored at the full side.
With --tiny-world N, the scenes are N seeded tiny-world scenes (seeds 0..N-1, every object and the
background, rendered at each of --sides) with their exact masks, instead of the photographs.
--json writes the table with the commit, the settings and the machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from em_core.crf import PRESETS, CRFParams, refine_masks
from em_core.images import open_image, open_mask
from em_core.masks import iou
from em_core.metrics import attention_like
from em_core.provenance import begin, command, machine

SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"


def photo_scenes(folder: str, side: int):
    """(name, (side, side, 3) uint8 image, [human masks]) of each photograph, resized to side."""
    for scene in sorted(p for p in Path(folder).iterdir() if (p / "img.jpg").is_file()):
        img = open_image(scene / "img.jpg")
        img = np.asarray(img.resize((side, side), Image.BICUBIC) if img.size != (side, side) else img)
        yield scene.name, img, [open_mask(p, (side, side)) for p in sorted(scene.glob("mask*.png"))]


def tiny_world_scenes(n: int, side: int):
    """(name, image, [true masks]) of tiny-world scenes 0..n-1: each object and the background."""
    from em_core.tiny_world.scenes import random_scene

    for seed in range(n):
        scene = random_scene(seed, size=side)
        yield f"tiny{seed}", np.asarray(scene.image.convert("RGB")), [m for m in scene.masks.values() if m.any()]


def main() -> None:
    started = begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 256, 128])
    ap.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                    help="seeds of the coarse masks' noise; the mean row averages over all of them")
    ap.add_argument("--scenes", default=str(SCENES))
    ap.add_argument("--max-side", type=int, default=None)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cutler")
    ap.add_argument("--tiny-world", type=int, default=0, metavar="N", help="N tiny-world scenes instead of the photos")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    params = CRFParams.preset(args.preset, max_side=args.max_side)
    print(f"DenseCRF preset {args.preset}, working side: {args.max_side or 'the image side'}")
    print(f"{'side':>5} {'seed':>4} {'scene':<10} {'IoU before':>10} {'IoU after':>10} {'CRF s':>6}")
    rows = []
    for side in args.sides:
        before, after, times = [], [], []
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            scenes = tiny_world_scenes(args.tiny_world, side) if args.tiny_world else photo_scenes(args.scenes, side)
            sb, sa = [], []
            for name, img, truth in scenes:
                coarse = np.stack([attention_like(t, rng) for t in truth])
                t0 = time.perf_counter()
                refined = refine_masks(img, coarse, params)
                dt = time.perf_counter() - t0
                times.append(dt)
                b = [iou(c, t) for c, t in zip(coarse, truth)]
                a = [iou(r, t) for r, t in zip(refined, truth)]
                sb += b
                sa += a
                print(f"{side:>5} {seed:>4} {name:<10} {np.mean(b):>10.3f} {np.mean(a):>10.3f} {dt:>6.2f}")
                rows.append({"side": side, "seed": seed, "scene": name, "iou_before": b, "iou_after": a, "crf_s": dt})
            if len(args.seeds) > 1:
                print(f"{side:>5} {seed:>4} {'mean':<10} {np.mean(sb):>10.3f} {np.mean(sa):>10.3f}        "
                      f"gain {100 * (np.mean(sa) - np.mean(sb)):+.1f}")
                rows.append({"side": side, "seed": seed, "scene": "mean", "iou_before": float(np.mean(sb)),
                             "iou_after": float(np.mean(sa)), "masks": len(sb)})
            before += sb
            after += sa
        print(f"{side:>5} {'all':>4} {'mean':<10} {np.mean(before):>10.3f} {np.mean(after):>10.3f} "
              f"{np.mean(times):>6.2f}  gain {100 * (np.mean(after) - np.mean(before)):+.1f} IoU points over "
              f"{len(before)} masks")
        rows.append({"side": side, "seed": "all", "scene": "mean", "iou_before": float(np.mean(before)),
                     "iou_after": float(np.mean(after)), "crf_s": float(np.mean(times)),
                     "crf_s_median": float(np.median(times)), "masks": len(before)})
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command(), "commit": started,
            "preset": args.preset, "params": params.to_dict(), "seeds": args.seeds, "sides": args.sides,
            "data": f"tiny world, scenes 0..{args.tiny_world - 1}" if args.tiny_world else "photographs",
            "machine": machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
