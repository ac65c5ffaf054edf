"""An `evaluate` run's read-back split by where a method's final masks are right (issue 14, gate 4):
over the scenes whose final masks it got right (mean IoU >= 0.95) and wrong, its concepts' colour and
shape beside the true-mask tokens' on the same scenes (from the same run, or `--true-masks` another). Where the
masks are right, what is left of the gap is the tokens' history; where they are wrong, the masks.

    python benchmarks/eval_split.py research/tiny_world_photo/eval_30_lr2e-3/partial.json \
        --method em_exclusive_fill --json benchmarks/results_eval_split_photo_lr2e-3.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from em_core.atomic import write_json
from em_core.provenance import begin, provenance
from em_core.tiny_world.evaluate import concept_task, eval_set

from em_relearn import per_scene, show, summarise  # this folder, on sys.path when run as a script


def rows_of(partial: dict, method: str) -> list[dict]:
    """em_relearn's rows (scene, mask_iou, and per image: held-out flag, each run's colour and shape)
    from an `evaluate` run. A concept read back as matched keeps its flag: only concepts of one init
    word, so of one shape, are matched."""
    res = partial["results"]
    if method not in res or "true_masks" not in res:
        raise SystemExit(f"{method!r} and 'true_masks' must both be in the run; it holds {sorted(res)}")
    n, images = len(res[method]["final_iou"]), partial["key"]["gen_images"]
    flags = [[f["held_out"] for f in concept_task(s)[3].values() for _ in range(images)] for s in eval_set(n)]
    for run in (method, "true_masks"):
        if len(res[run]["fid_colour"]) != sum(map(len, flags)):
            raise SystemExit(f"{run}: {len(res[run]['fid_colour'])} images in the run, {sum(map(len, flags))} "
                             f"expected from {n} scenes at {images} per concept")
    return [{"scene": k, "mask_iou": res[method]["final_iou"][k], "held_out": f, "em": e, "true_masks": t}
            for k, (f, e, t) in enumerate(zip(flags, per_scene(res[method], flags), per_scene(res["true_masks"], flags)))]


def main() -> None:
    begin()
    ap = argparse.ArgumentParser()
    ap.add_argument("partial", help="an evaluate run's partial.json")
    ap.add_argument("--method", default="em_exclusive_fill")
    ap.add_argument("--true-masks", default=None,
                    help="another evaluate partial.json whose true_masks ran the same scenes and seed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    partial = json.loads(Path(args.partial).read_text())
    if args.true_masks:
        other = json.loads(Path(args.true_masks).read_text())
        differ = [k for k in ("gen_images", "seed") if other["key"][k] != partial["key"][k]]
        if differ:
            raise SystemExit(f"--true-masks: {args.true_masks} ran with other {', '.join(differ)} than {args.partial}")
        partial["results"]["true_masks"] = other["results"]["true_masks"]
    summary = summarise(rows_of(partial, args.method))
    show(summary)
    if args.json:
        write_json(args.json, {"summary": summary, **provenance(config=vars(args))})


if __name__ == "__main__":
    main()
