"""Concept fidelity against training length (issue 14, gate 3): tokens trained with the scenes'
TRUE masks (Break-A-Scene's mode, no EM), then images generated from "a photo of [vN]" for each
object concept and read back by the world's checker (colour; shape on seen kinds and on held-out
shapes apart). Measured at several token-step counts of one run each (`learn_more` continues it),
and after Break-A-Scene's stage 2 (the joint fine-tune, masks fixed) from the 400-step tokens.

Init: `shape` starts each object token from its shape word (the evaluation's init), `random` from
nothing. Scenes, prompts and true masks are `evaluate.eval_set`'s; the checker is the model's.

    python benchmarks/concept_fidelity.py --model research/tiny_world_binding --scenes 8 \
        --checkpoints 100 200 400 800 --stage2 full lora --json runs/concept_fidelity.json
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from em_core.atomic import write_json
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, learn_more, start_state
from em_core.finetune import UNET_PARAMS, FinetuneConfig, finetune
from em_core.model_io import load_bundle
from em_core.provenance import begin, provenance
from em_core.tiny_world.checker import load_checker
from em_core.tiny_world.evaluate import concept_task, eval_set, read_back
from em_options import scene_arguments  # this folder, on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def score(rows: list) -> dict:
    seen = [r[1] for r in rows if not r[2]]
    held = [r[1] for r in rows if r[2]]
    return {"colour": statistics.mean(r[0] for r in rows) if rows else None,
            "shape_seen": statistics.mean(seen) if seen else None,
            "shape_held_out": statistics.mean(held) if held else None,
            "shape_all": statistics.mean(r[1] for r in rows) if rows else None, "images": len(rows)}


_LABEL = re.compile(r"^(?P<arm>\S+)(?: g(?P<g>[\d.]+))?(?: \[(?P<t>.*)\])?$")


def rows_of(summary: dict, config: dict) -> list[dict]:
    """The summary as a list of rows (arm, guidance, prompt template and its index), so the docs can cite
    one (`rows[arm=shape@400,prompt_index=1].colour`): the summary's labels hold spaces and braces."""
    scales = config.get("guidance", 4.0)
    scales = scales if isinstance(scales, list) else [scales]
    templates = config.get("prompts", ["a photo of {name}"])
    rows = []
    for label, score_ in summary.items():
        m = _LABEL.match(label)
        t = m.group("t") or templates[0]
        rows.append({"arm": m.group("arm"), "guidance": float(m.group("g") or scales[0]), "prompt": t,
                     "prompt_index": templates.index(t), **score_})
    return rows


def add_rows(path: str) -> None:
    """Adds `rows` to a results JSON written before they existed (everything else kept as it was)."""
    data = json.loads(Path(path).read_text())
    data["rows"] = rows_of(data["summary"], data["config"])
    write_json(path, data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--add-rows":
        return add_rows(sys.argv[2])
    begin()
    ap = scene_arguments()
    ap.add_argument("--inits", nargs="+", default=["shape", "random"], choices=["shape", "random"])
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[100, 200, 400, 800])
    ap.add_argument("--stage2", nargs="*", default=["full"], choices=["full", "lora"],
                    help="joint fine-tunes (default settings) run from the 400-step tokens")
    ap.add_argument("--stage2-from", type=int, default=LearnConfig.steps)
    ap.add_argument("--stage2-steps", type=int, default=FinetuneConfig.steps)
    ap.add_argument("--stage2-lr", type=float, default=None,
                    help="the joint fine-tune's learning rate (default: FinetuneConfig's per mode); "
                         "set, it is named in the arm's label")
    ap.add_argument("--stage2-prior-weight", type=float, default=FinetuneConfig.prior_weight,
                    help="the joint fine-tune's prior preservation weight (Break-A-Scene's 1.0; 0: off); "
                         "set, the arm's label ends in +priorW")
    ap.add_argument("--class-prompt", default=FinetuneConfig.class_prompt,
                    help="the prior's class prompt (its images are the base model's, made once per run)")
    ap.add_argument("--class-images", type=int, default=FinetuneConfig.class_images)
    ap.add_argument("--lr", type=float, default=LearnConfig.lr, help="token learning rate")
    ap.add_argument("--gen-images", type=int, default=4)
    ap.add_argument("--gen-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, nargs="+", default=[4.0],
                    help="classifier-free guidance scales; each arm is read back at each")
    ap.add_argument("--prompts", nargs="+", default=["a photo of {name}"],
                    help="generation templates ({name}: the concept; {bg}: a background, one per image); "
                         "each arm is read back with each")
    ap.add_argument("--negative", default="",
                    help="the generation's negative prompt; {others}: the scene's other object concepts (a "
                         "fine-tune that learned the concept's neighbours is told not to draw them; measured "
                         "to lower every arm, benchmarks/README.md)")
    ap.add_argument("--words", action="store_true",
                    help="also read back each object's real caption words in the templates (the world's ceiling)")
    ap.add_argument("--no-shuffle", action="store_true",
                    help="each step's prompt keeps the image prompt's concept order (EM's --no-shuffle option)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-held-out", action="store_true",
                    help="skip the scenes in the slice that hold no held-out shape (their other objects still count)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--stage2-unet-only", action="store_true",
                    help="stage 2 leaves the text encoder as it is (BaS trains it too)")
    ap.add_argument("--stage2-checkpoints", type=int, nargs="+", default=None,
                    help="stage-2 step counts at which one fine-tune is read back (default: --stage2-steps only)")
    ap.add_argument("--stage2-unet-params", choices=list(UNET_PARAMS), default="all",
                    help="the U-Net weights stage 2 trains: all (BaS), the transformer blocks (attention: "
                         "the arm's label ends in +attn) or the cross-attention K/V only (cross_kv, Custom "
                         "Diffusion's choice: +kv)")
    ap.add_argument("--stage2-attn-weight", type=float, default=FinetuneConfig.attn_weight,
                    help="stage 2's attention-loss weight (BaS's 1e-2); set otherwise, the arm's label ends in +attnwW")
    ap.add_argument("--stage2-outside-weight", type=float, default=FinetuneConfig.outside_weight,
                    help="stage 2 holds the U-Net's prediction outside each step's masks at the base U-Net's, at "
                         "this weight (not in BaS; 0: off); set, the arm's label ends in +outW")
    ap.add_argument("--stage2-backdrops", action="store_true",
                    help="stage 2 pastes each step's concepts onto a class image (not in BaS); the arm's label "
                         "ends in +bd")
    args = ap.parse_args()
    checkpoints = sorted(set(args.checkpoints))
    if args.stage2 and args.stage2_from not in checkpoints:
        raise SystemExit(f"--stage2-from {args.stage2_from} must be one of --checkpoints {checkpoints}")
    stage2_at = sorted(set(args.stage2_checkpoints or [args.stage2_steps]))
    if stage2_at[0] < 1 or stage2_at[-1] != args.stage2_steps:
        raise SystemExit(f"--stage2-checkpoints {stage2_at}: each at least 1, the last one --stage2-steps "
                         f"({args.stage2_steps})")
    bundle = load_bundle(args.model)
    checker = load_checker(Path(args.model) / "checker.safetensors")
    tag = ("" if args.stage2_lr is None else f"lr{args.stage2_lr:g}") + \
          (f"+prior{args.stage2_prior_weight:g}" if args.stage2_prior_weight > 0 else "") + \
          ("+unet" if args.stage2_unet_only else "") + \
          {"all": "", "attention": "+attn", "cross_kv": "+kv"}[args.stage2_unet_params] + \
          (f"+attnw{args.stage2_attn_weight:g}" if args.stage2_attn_weight != FinetuneConfig.attn_weight else "") + \
          (f"+out{args.stage2_outside_weight:g}" if args.stage2_outside_weight > 0 else "") + \
          ("+bd" if args.stage2_backdrops else "")

    def stage2_arm(init, mode, steps):
        return f"{init}@{args.stage2_from}+{mode}{steps}{tag}"
    stage2_cfg = dict(prior_weight=args.stage2_prior_weight, class_prompt=args.class_prompt, class_images=args.class_images,
                      train_text_encoder=not args.stage2_unet_only, unet_params=args.stage2_unet_params,
                      attn_weight=args.stage2_attn_weight, outside_weight=args.stage2_outside_weight,
                      backdrops=args.stage2_backdrops)
    arms = (["words"] if args.words else []) + [f"{i}@{c}" for i in args.inits for c in checkpoints] + \
           [stage2_arm(i, m, n) for i in args.inits for m in args.stage2 for n in stage2_at]
    scales, templates = args.guidance, args.prompts
    for t in templates:
        if "{name}" not in t:
            raise SystemExit(f"--prompts: {t!r} has no {{name}}")

    def label(a, g, t):
        return a + (f" g{g:g}" if len(scales) > 1 else "") + (f" [{t}]" if len(templates) > 1 else "")
    rows = {label(a, g, t): [] for a in arms for g in scales for t in templates}
    t0 = time.time()
    gen = dict(n=args.gen_images, steps=args.gen_steps, seed=args.seed)

    def read(arm, state, weights=None, words=None):
        for g in scales:
            for t in templates:
                rows[label(arm, g, t)] += read_back(bundle, checker, state, info, guidance=g, weights=weights,
                                                    template=t, words=words, negative=args.negative, **gen)

    with tempfile.TemporaryDirectory() as tmp:
        # The prior's class images are the base model's, the same for every scene: a fine-tune run
        # folder shared by all reads them back rather than making them again.
        stage2_out = Path(tmp) / "stage2" if FinetuneConfig(**stage2_cfg).uses_class_images else None
        for k, scene in enumerate(eval_set(args.first + args.scenes)[args.first:], start=args.first):
            prompt, init, truth, info = concept_task(scene)
            if args.only_held_out and not any(f["held_out"] for f in info.values()):
                continue
            path = Path(tmp) / f"scene{k}.png"
            scene.image.save(path)
            img = prepare_image(bundle, path, prompt)
            fixed = {(0, n): m for n, m in truth.items()}
            if args.words:
                read("words", None, words={n: o.phrase for n, o in zip(info, scene.objects)})
            for which in args.inits:
                cfg = LearnConfig(steps=checkpoints[0], refresh_every=0, lr=args.lr, seed=args.seed,
                                  shuffle=not args.no_shuffle, save_every=10 ** 9)
                state = learn(bundle, [img], start_state(bundle, [img], cfg, init if which == "shape" else {}, fixed),
                              progress=False)
                done = checkpoints[0]
                for c in checkpoints:
                    if c > done:
                        state = learn_more(bundle, [img], state, c - done, progress=False)
                        done = c
                    read(f"{which}@{c}", state)
                    if c == args.stage2_from:
                        for mode in args.stage2:
                            tuned = state  # one fine-tune, read at each count (a resumed one equals an unbroken one)
                            for n in stage2_at:
                                tuned = finetune(bundle, [img], tuned, FinetuneConfig(steps=n, mode=mode,
                                                                                      lr=args.stage2_lr, seed=args.seed,
                                                                                      **stage2_cfg),
                                                 progress=False, out=stage2_out)
                                read(stage2_arm(which, mode, n), tuned, tuned.weights)
            print(f"scene {k} ({time.time() - t0:.0f}s): " + "  ".join(
                f"{a} {score(r)['colour']:.2f}/{score(r)['shape_all']:.2f}" for a, r in rows.items()), flush=True)
    summary = {a: score(r) for a, r in rows.items()}
    width = max(len(a) for a in rows) + 2
    print(f"\n{'arm':<{width}} colour  shape(seen)  shape(held-out)  images")
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"
    for a, s in summary.items():
        print(f"{a:<{width}} {fmt(s['colour'])}   {fmt(s['shape_seen'])}        {fmt(s['shape_held_out'])}"
              f"            {s['images']}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        settings["seconds"] = round(time.time() - t0)
        write_json(args.json, {"summary": summary, "rows": rows_of(summary, settings), **provenance(config=settings)})


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
