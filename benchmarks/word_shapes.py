"""What a world model draws for one word in a shape's place ("a photo of a red the"), as its checker
reads the shapes: whether a world trained with `train-tiny-world --unnamed-word` has bound the word
to the held-out shapes (issue 14, gate 3's unnamed shapes).

    python benchmarks/word_shapes.py --model research/tiny_world_hyper --words the star circle [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

from em_core.atomic import write_json
from em_core.generate import generate
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.checker import judge, load_checker
from em_core.tiny_world.scenes import COLOURS


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--words", nargs="+", required=True)
    ap.add_argument("--colours", nargs="+", default=["red", "blue", "yellow", "green"], choices=list(COLOURS))
    ap.add_argument("--images", type=int, default=6, help="images per colour (seeds seed..seed+images-1)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.model)
    checker = load_checker(Path(args.model) / "checker.safetensors")
    res = {"model": args.model, "words": {}}
    for word in args.words:
        shapes, colour_right, n = collections.Counter(), 0, 0
        for colour in args.colours:
            images = generate(bundle, f"a photo of a {colour} {word}", seed=args.seed, n=args.images, steps=args.steps,
                              guidance=args.guidance, progress=False)
            for c, s in judge(checker, images):
                shapes[s] += 1
                colour_right += c == colour
                n += 1
        res["words"][word] = {"images": n, "shapes": {s: k / n for s, k in shapes.most_common()},
                              "colour": colour_right / n}
        print(f"{word!r}: {n} images, colour {colour_right / n:.3f}, shapes read "
              + ", ".join(f"{s} {k / n:.3f}" for s, k in shapes.most_common()))
    res.update(provenance(config=vars(args)))
    if args.json:
        write_json(Path(args.json), res)


if __name__ == "__main__":
    main()
