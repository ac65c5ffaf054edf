"""DenseCRF on the real photographs with human masks (../shared/data/scenes).

Each human mask is made attention-like (16x16, blurred, noisy, blown up, thresholded low),
then refined by DenseCRF with the paper's (CutLER's) settings; prints IoU against the human
mask before and after, per scene and on average, at several image sides.

    python benchmarks/crf_real_photos.py [--sides 512 256 128] [--seed 0] [--max-side 256]

With --max-side, the CRF runs at that side at most and its result is scored at the full side.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from em_core.crf import CRFParams, refine_masks
from em_core.images import open_image, open_mask
from em_core.masks import iou
from em_core.metrics import attention_like

SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 256, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", default=str(SCENES))
    ap.add_argument("--max-side", type=int, default=None)
    args = ap.parse_args()
    print(f"DenseCRF working side: {args.max_side or 'the image side'}")
    scenes = sorted(p for p in Path(args.scenes).iterdir() if (p / "img.jpg").is_file())
    print(f"{'side':>5} {'scene':<10} {'IoU before':>10} {'IoU after':>10} {'CRF s':>6}")
    for side in args.sides:
        rng = np.random.default_rng(args.seed)
        before, after, times = [], [], []
        for scene in scenes:
            img = open_image(scene / "img.jpg")
            img = np.asarray(img.resize((side, side), Image.BICUBIC) if img.size != (side, side) else img)
            truth = [open_mask(p, (side, side)) for p in sorted(scene.glob("mask*.png"))]
            coarse = np.stack([attention_like(t, rng) for t in truth])
            t0 = time.perf_counter()
            refined = refine_masks(img, coarse, CRFParams(max_side=args.max_side))
            dt = time.perf_counter() - t0
            times.append(dt)
            b = [iou(c, t) for c, t in zip(coarse, truth)]
            a = [iou(r, t) for r, t in zip(refined, truth)]
            before += b
            after += a
            print(f"{side:>5} {scene.name:<10} {np.mean(b):>10.3f} {np.mean(a):>10.3f} {dt:>6.2f}")
        print(f"{side:>5} {'mean':<10} {np.mean(before):>10.3f} {np.mean(after):>10.3f} {np.mean(times):>6.2f}  "
              f"gain {100 * (np.mean(after) - np.mean(before)):+.1f} IoU points over {len(before)} masks")


if __name__ == "__main__":
    main()
