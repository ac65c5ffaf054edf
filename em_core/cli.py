"""`python -m em_core ...`: the engine from the shell."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .crf import PRESETS, CRFParams
from .runlock import RunLocked, hold, release_held
from .tiny_world import SHIPPED_MODEL


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what}: {item!r} is not of the form [vN]=VALUE")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def cmd_make_tiny_model(args) -> int:
    from .tiny_world.tiny_model import make_tiny_model

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"DIR: {out} is a file; give a folder path")
    make_tiny_model(out, seed=args.seed, kind=args.kind)
    print(f"wrote a random {args.kind} model to {out}")
    return 0


def cmd_refine_masks(args) -> int:
    import numpy as np

    from .atomic import inside, prepare_out, write_atomic
    from .crf import refine_masks
    from .images import mask_to_image, open_image, open_mask

    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations {args.iterations}: DenseCRF needs at least 1 mean-field iteration")
    if args.max_side is not None and args.max_side < 0:
        raise ValueError(f"--max-side {args.max_side}: give a side in pixels, or 0 for the image's full size")
    img = open_image(args.image, "--image")
    masks = np.stack([open_mask(m, img.size, f"--mask {m}", image_size=img.size) for m in args.mask])
    params = CRFParams.preset(args.crf_preset, unary_scale=args.unary_scale, max_side=args.max_side or None,
                              **({} if args.iterations is None else {"iterations": args.iterations}))
    refined = refine_masks(np.asarray(img), masks, params)
    out = prepare_out(args.out)
    for path, m, name in zip(args.mask, refined, _unique_stems(args.mask)):
        target = inside(out, f"{name}_refined.png")
        pic = mask_to_image(m.astype(np.float32))
        write_atomic(target, lambda tmp: pic.save(tmp, format="PNG"))
        print(target)
    return 0


def _unique_stems(paths: list[str]) -> list[str]:
    """File stems, made unique (case aside, for file systems that ignore it): a.png, b/a.png ->
    a, a_2, so that two masks of one name from two folders never write one output."""
    out, taken = [], set()
    for p in paths:
        stem, n = Path(p).stem, 1
        name = stem
        while name.lower() in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name.lower())
        out.append(name)
    return out


def cmd_learn(args) -> int:
    import torch

    from .atomic import prepare_out
    from .config import LearnConfig
    from .dataset import check_prompts, prepare_image
    from .em_loop import continue_run, learn, start_state
    from .images import open_mask
    from .integrity import check_fits_model
    from .model_io import load_bundle
    from .state import load_state
    from .training import interrupted_message

    d = LearnConfig()
    if not args.image:
        raise ValueError("--image: give at least one image, each followed by its --prompt")
    check_prompts(args.image, args.prompt)
    out = hold(prepare_out(args.out))
    bundle = load_bundle(args.model, device=args.device, prediction_type=args.prediction_type)
    resume = (out / "state.safetensors").is_file()
    if resume:
        state = load_state(out)
        check_fits_model(state, bundle, out)
        given = [(str(Path(i).resolve()), p) for i, p in zip(args.image, args.prompt)]
        stored = [(r["path"], r["prompt"]) for r in state.images]
        if given != stored:
            raise ValueError(f"--out: {out} holds a run on other images or prompts; give the same ones to resume, "
                             "or another --out to start afresh")
        before = state.status
        state = continue_run(state, args.steps, "--steps")
        config = state.config
        if args.init or args.mask:
            print("note: --init and --mask apply to a new run only; the resumed run keeps its tokens and masks",
                  file=sys.stderr)
        done = state.step - config.warmup_steps
        if before == "done":
            print(f"continuing the finished run in {out}: {args.steps} more EM steps, {done} -> {config.steps}")
        else:
            print(f"resuming the {before} run in {out} from EM step {done}: it ends at {config.steps} "
                  f"({args.steps} from the step it started at, {state.run_from})")
    else:
        config = LearnConfig(
            steps=args.steps, lr=args.lr, attn_weight=args.attn_weight, refresh_every=args.refresh_every,
            mask_timesteps=args.mask_timesteps, refresh_timesteps=args.refresh_timesteps,
            timestep_sampling=args.timestep_sampling,
            threshold=args.threshold, crf=CRFParams.preset(args.crf_preset),
            use_crf=not args.no_crf, warmup_steps=args.warmup_steps, flip=not args.no_flip,
            mask_layers=args.mask_layers or args.layers or d.mask_layers,
            loss_layers=args.loss_layers or args.layers or d.loss_layers, background=args.background,
            mask_t_range=tuple(args.mask_t_range) if args.mask_t_range else None, eval_every=args.eval_every,
            mask_stickiness=args.mask_stickiness, exclusive_masks=args.exclusive_masks, fill_lost=args.fill_lost,
            share_parts=args.share_parts, restart_moved=args.restart_moved, shuffle=not args.no_shuffle,
            step_prompt=args.step_prompt,
            resolution=args.resolution, seed=args.seed, save_every=args.save_every,
        )
    images = [prepare_image(bundle, Path(i).resolve(), p, config.resolution, config.flip)
              for i, p in zip(args.image, args.prompt)]
    if not resume:
        init = dict(_pairs(args.init, "--init"))
        fixed = {}
        for key, path in _pairs(args.mask, "--mask"):
            name, _, which = key.partition("@")
            owners = [i for i, img in enumerate(images) if name in img.names]
            if which:
                if not which.isdigit():
                    raise ValueError(f"--mask {key}: write the image number after @, e.g. {name}@2=FILE.png")
                idx = int(which) - 1
                if idx not in owners:
                    raise ValueError(f"--mask {key}: image {which} does not show {name}")
            elif len(owners) == 1:
                idx = owners[0]
            else:
                raise ValueError(f"--mask {key}: {name} is in {len(owners)} images; write {name}@N=FILE for image N")
            fixed[(idx, name)] = open_mask(path, images[idx].size, f"--mask {key}",
                                           image_size=images[idx].original_size)
        state = start_state(bundle, images, config, init, fixed)
    torch.manual_seed(config.seed)
    try:
        state = learn(bundle, images, state, out=out, progress=not args.quiet)
    except KeyboardInterrupt as exc:
        print("\n" + interrupted_message(exc, out), file=sys.stderr)
        return 130
    print(f"{state.status}: {state.step} steps; state, masks and history in {out}" +
          (f" ({state.message})" if state.message else ""))
    return 0 if state.status == "done" else 1




def cmd_demo(args) -> int:
    from .tiny_world.demo import run_demo

    run_demo(args.out, scene=args.scene, steps=args.steps, seed=args.seed, progress=not args.quiet)
    return 0


def _images_of(bundle, state):
    from .dataset import prepare_image

    return [prepare_image(bundle, r["path"], r["prompt"], state.config.resolution, state.config.flip)
            for r in state.images]


def cmd_finetune(args) -> int:
    from .atomic import prepare_out
    from .finetune import FinetuneConfig, finetune, finetune_steps
    from .integrity import check_fits_model
    from .model_io import load_bundle
    from .state import load_state
    from .training import interrupted_message

    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: a learning rate must be above 0")
    out = hold(prepare_out(args.state))
    state = load_state(out)
    if state.finetune:
        had = state.finetune["config"]
        for opt, given, kept in (("--mode", args.mode, had["mode"]), ("--lr", args.lr, had.get("lr"))):
            if given is not None and given != kept:
                raise ValueError(f"{opt} {given}: the fine-tune in {out} runs with {opt[2:]} {kept} and continues "
                                 f"with it; drop {opt}, or fine-tune a copy of the learn run's folder afresh")
    model = args.model or state.model
    if not model or model.startswith("random:"):
        raise ValueError(f"--model: the state names no model folder ({model!r}); give --model DIR")
    bundle = load_bundle(model, device=args.device, prediction_type=args.prediction_type)
    check_fits_model(state, bundle, out)
    images = _images_of(bundle, state)
    run_from, end = finetune_steps(state, args.steps, "--steps")
    if state.finetune:
        cfg = FinetuneConfig.from_dict(state.finetune["config"])
        cfg.steps = end
        ft = state.finetune
        print(f"continuing the finished fine-tune: {args.steps} more steps, {ft['step']} -> {end}"
              if ft["status"] == "done" else
              f"resuming the {ft['status']} fine-tune from step {ft['step']}: it ends at {end} ({args.steps} "
              f"from the step it started at, {run_from})")
    else:
        cfg = FinetuneConfig(steps=end, mode=args.mode or "full", lr=args.lr, rank=args.rank,
                             train_text_encoder=not args.no_text_encoder, attn_weight=args.attn_weight,
                             gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                             max_grad_norm=args.max_grad_norm, seed=args.seed, save_every=args.save_every,
                             prior_weight=args.prior_weight, class_prompt=args.class_prompt,
                             class_images=args.class_images, class_steps=args.class_steps)
    try:
        state = finetune(bundle, images, state, cfg, out=out, progress=not args.quiet, run_from=run_from)
    except KeyboardInterrupt as exc:
        print("\n" + interrupted_message(exc, out, finetune=True), file=sys.stderr)
        return 130
    ft = state.finetune
    print(f"{ft['status']}: {ft['step']} fine-tune steps ({cfg.mode}); {out / 'concepts.safetensors'}"
          + (f" ({ft['message']})" if ft["message"] else ""))
    return 0 if ft["status"] == "done" else 1


def cmd_generate(args) -> int:
    from .atomic import inside, prepare_out, write_atomic
    from .concept_file import load_concepts
    from .generate import generate
    from .model_io import load_bundle

    out = prepare_out(args.out)
    bundle = load_bundle(args.model, device=args.device, prediction_type=args.prediction_type)
    cb = load_concepts(args.concepts, bundle, allow_other_model=args.allow_other_model) if args.concepts else None
    images = generate(bundle, args.prompt, concepts=cb.concepts if cb else None, weights=cb.weights if cb else None,
                      negative=args.negative, seed=args.seed, steps=args.steps, guidance=args.guidance,
                      scheduler=args.scheduler, width=args.width, height=args.height, n=args.n,
                      progress=not args.quiet)
    for i, img in enumerate(images):
        path = inside(out, f"seed{args.seed}_{i:02d}.png")
        write_atomic(path, lambda tmp, im=img: im.save(tmp, format="PNG"))
        print(path)
    return 0


def cmd_export(args) -> int:
    from .concept_file import load_concepts
    from .export import export_concepts

    if args.rank < 1:
        raise ValueError(f"--rank {args.rank}: a LoRA's rank is at least 1")
    cb = load_concepts(args.concepts)
    name = args.name or Path(args.concepts).resolve().parent.name
    written = export_concepts(cb, args.out, name, rank=args.rank)
    for f in written["embeddings"]:
        print(f"{f}  (use as embedding:{f.stem})")
    if written["lora"]:
        print(f"{written['lora']}  (core Load LoRA)")
        if written["skipped"]:
            print(f"note: {len(written['skipped'])} weight(s) have no LoRA form ComfyUI loads "
                  "(norms, biases, embeddings) and were left out")
    return 0


def cmd_train_tiny_world(args) -> int:
    from .tiny_world.checker import train_and_save_checker
    from .tiny_world.world_train import train_tiny_world, write_model_card

    out = Path(args.out)
    if not args.card_only:
        train_tiny_world(out, minutes=args.minutes, batch=args.batch, seed=args.seed, vae_share=args.vae_share,
                         init_from=args.init_from, attn_weight=args.attn_weight, lr=args.lr,
                         checkpoint_minutes=args.checkpoint_minutes, photo_share=args.photo_share,
                         unnamed_share=args.unnamed_share, unnamed_colour=args.unnamed_colour,
                         unnamed_word=args.unnamed_word, vae_all_shapes=args.vae_all_shapes)
        if args.checker_seconds > 0 or not (out / "checker.safetensors").is_file():
            train_and_save_checker(out / "checker.safetensors", args.checker_seconds or 150, args.seed)
    print(write_model_card(out))
    return 0


def cmd_tune_world_decoder(args) -> int:
    from .tiny_world.decoder_tune import tune_decoder

    rec = tune_decoder(args.model, args.out, steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed)
    for shape in rec["roundtrip_after"]:
        before, after = rec["roundtrip_before"][shape]["right"], rec["roundtrip_after"][shape]["right"]
        if before is not None:
            print(f"{shape}: round trips read right {before:.3f} -> {after:.3f}")
    print(args.out)
    return 0


def cmd_train_checker(args) -> int:
    from .tiny_world.checker import train_and_save_checker

    acc = train_and_save_checker(args.out, args.seconds, args.seed)
    print(f"checker: colour accuracy {acc['colour']:.3f}, shape accuracy {acc['shape']:.3f} "
          f"on 512 fresh scenes after {acc['steps']} steps; {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .tiny_world.evaluate import METHODS, evaluate

    args.methods = args.methods or METHODS
    s = evaluate(args.model, args.out, scenes=args.scenes, steps=args.steps, refresh=args.refresh,
                 timesteps=args.mask_timesteps, refresh_timesteps=args.refresh_timesteps, gen_images=args.gen_images,
                 checker_path=args.checker, seed=args.seed, methods=tuple(args.methods),
                 quality_images=args.quality_images, lr=args.lr, step_prompt=args.step_prompt,
                 guidance=args.guidance)
    for m, row in s["table"].items():
        print(f"{m:<17} mask IoU {row['mask_iou']:.3f}  colour {row['fid_colour']:.3f}  "
              f"shape {row['fid_shape_seen']:.3f} (held-out {row['fid_shape_held_out']:.3f})")
    print(f"report: {Path(args.out) / 'report.md'}, plot: {Path(args.out) / 'iou_curve.png'}")
    return 0


PREDICTION_TYPE = dict(
    choices=["epsilon", "v_prediction"], default=None,
    help="what a single-file checkpoint's U-Net predicts. SD 1.x: epsilon (the default). SD 2.x files rarely say, "
         "so give it: epsilon for SD 2.1-base / 2.0-base (512 px), v_prediction for SD 2.1 / 2.0 (768 px). "
         "A diffusers folder states its own")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m em_core", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-tiny-model", help="write a small random SD-class model in diffusers format")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--kind", choices=["tiny", "sd15", "tiny_xl", "sdxl"], default="tiny",
                   help="tiny_xl: an SDXL-shaped tiny model; sd15 / sdxl: the real shapes (large)")
    m.set_defaults(func=cmd_make_tiny_model)

    r = sub.add_parser("refine-masks", help="DenseCRF-refine binary masks against an image")
    r.add_argument("--image", required=True)
    r.add_argument("--mask", action="append", required=True, help="one per concept; repeat")
    r.add_argument("--out", required=True)
    r.add_argument("--crf-preset", choices=sorted(PRESETS), default="cutler",
                   help="pairwise settings: CutLER's (the paper's) or DeepLab-v2's")
    r.add_argument("--iterations", type=int, default=None, help="mean-field iterations (default: the preset's, 10)")
    r.add_argument("--unary-scale", type=float, default=1.0)
    r.add_argument("--max-side", type=int, default=CRFParams().max_side,
                   help="DenseCRF works with the longer side at most this many pixels (default, 0: full size)")
    r.set_defaults(func=cmd_refine_masks)

    dm = sub.add_parser("demo", help="the main job on the embedded default model, with no download")
    dm.add_argument("--out", default="demo-out")
    dm.add_argument("--steps", type=int, default=100)
    dm.add_argument("--scene", type=int, default=3, help="which seeded tiny-world scene")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--quiet", action="store_true")
    dm.set_defaults(func=cmd_demo)

    f = sub.add_parser("finetune", help="joint fine-tune of tokens and weights, masks fixed")
    f.add_argument("--state", required=True, help="the OUT folder of a learn run")
    f.add_argument("--steps", type=int, default=400,
                   help="fine-tune steps this command runs, as a Joint Finetune node's steps: on a state with a "
                        "finished fine-tune, that many more; an interrupted one is finished by the same command")
    f.add_argument("--mode", choices=["full", "lora"], default=None, help="full (default) or lora")
    f.add_argument("--rank", type=int, default=4)
    f.add_argument("--lr", type=float, default=None, help="default 2e-6 (full) or 1e-4 (lora)")
    f.add_argument("--attn-weight", type=float, default=1e-2)
    f.add_argument("--no-text-encoder", action="store_true", help="train the U-Net (and tokens) only")
    f.add_argument("--gradient-checkpointing", action="store_true")
    f.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="fp16 (CUDA only) runs with a loss scaler, as Break-A-Scene")
    f.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the total gradient norm to this (Break-A-Scene's 1.0); 0: no clipping")
    f.add_argument("--prior-weight", type=float, default=0.0,
                   help="prior preservation (Break-A-Scene: 1.0): the base model's images of --class-prompt keep "
                        "their own diffusion loss times this; 0 (default): off")
    f.add_argument("--class-prompt", default="a photo at the beach", help="Break-A-Scene's class prompt")
    f.add_argument("--class-images", type=int, default=100,
                   help="images the base model makes from --class-prompt first, kept in STATE/class_images/")
    f.add_argument("--class-steps", type=int, default=50, help="sampling steps per class image")
    f.add_argument("--model", default=None, help="model folder, if not the one the state was learned on")
    f.add_argument("--prediction-type", **PREDICTION_TYPE)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--save-every", type=int, default=100)
    f.add_argument("--device", default="cpu")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_finetune)

    g = sub.add_parser("generate", help="images from a prompt with learned concepts")
    g.add_argument("--model", required=True)
    g.add_argument("--prediction-type", **PREDICTION_TYPE)
    g.add_argument("--concepts", default=None, help="a concept file (OUT/concepts.safetensors of learn / finetune)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--scheduler", default="ddim", help="ddim, dpmpp_2m, euler, euler_a or pndm")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--out", required=True)
    g.add_argument("--allow-other-model", action="store_true")
    g.add_argument("--device", default="cpu")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="embeddings and a LoRA for ordinary ComfyUI graphs")
    e.add_argument("--concepts", required=True, help="a concept file (OUT/concepts.safetensors of learn / finetune)")
    e.add_argument("--out", required=True, help="writes OUT/embeddings/ and OUT/loras/")
    e.add_argument("--name", default=None, help="file name stem; default: the concept file's folder name")
    e.add_argument("--rank", type=int, default=16, help="LoRA rank extracted from a full fine-tune")
    e.set_defaults(func=cmd_export)

    tw = sub.add_parser("train-tiny-world", help="train the tiny world's model on procedural scenes (CPU)")
    tw.add_argument("--out", required=True)
    tw.add_argument("--minutes", type=float, default=45.0)
    tw.add_argument("--batch", type=int, default=64)
    tw.add_argument("--seed", type=int, default=0)
    tw.add_argument("--checker-seconds", type=float, default=150,
                    help="0: keep the checker already in --out (or --init-from's, copied with the model)")
    tw.add_argument("--vae-share", type=float, default=0.15, help="fraction of the minutes spent on the VAE")
    tw.add_argument("--init-from", default=None, help="go on training from a model this command wrote")
    tw.add_argument("--attn-weight", type=float, default=0.0,
                    help="weight of the word-to-object cross-attention supervision (0: none)")
    tw.add_argument("--lr", type=float, default=3e-4)
    tw.add_argument("--checkpoint-minutes", type=float, default=10.0, help="save the EMA weights this often")
    tw.add_argument("--photo-share", type=float, default=0.0,
                    help='share of captions in an "a photo of ..." form (with or without "on <background>")')
    tw.add_argument("--unnamed-share", type=float, default=0.0,
                    help="share of scenes drawn from every shape, the held-out shapes (star, cross) in the image "
                         "but never in the caption")
    tw.add_argument("--unnamed-colour", action="store_true",
                    help="with --unnamed-share: such objects stay in the caption by colour and pattern, their shape "
                         "unsaid (\"a purple striped and a red circle on grass\")")
    tw.add_argument("--unnamed-word", default=None,
                    help="with --unnamed-share: one word of the world's vocabulary said in the place of every held-out "
                         "shape (\"a purple striped the and a red circle on grass\"), bound to them")
    tw.add_argument("--vae-all-shapes", action="store_true",
                    help="the VAE's steps see every shape, the held-out ones (star, cross) too; by default only the "
                         "named ones")
    tw.add_argument("--card-only", action="store_true", help="only (re)write samples.png and README.md")
    tw.set_defaults(func=cmd_train_tiny_world)

    td = sub.add_parser("tune-world-decoder", help="tiny world: a copy whose VAE decoder is tuned on every shape "
                        "(stars and crosses included), the encoder and so every latent unchanged")
    td.add_argument("--model", required=True, help="a folder train-tiny-world wrote")
    td.add_argument("--out", required=True, help="a new folder")
    td.add_argument("--steps", type=int, default=300)
    td.add_argument("--lr", type=float, default=3e-4)
    td.add_argument("--batch", type=int, default=32)
    td.add_argument("--seed", type=int, default=0)
    td.set_defaults(func=cmd_tune_world_decoder)

    tc = sub.add_parser("train-checker", help="train the tiny world's colour/shape checker")
    tc.add_argument("--out", required=True, help="a .safetensors file")
    tc.add_argument("--seconds", type=float, default=180)
    tc.add_argument("--seed", type=int, default=0)
    tc.set_defaults(func=cmd_train_checker)

    ev = sub.add_parser("evaluate", help="tiny world: baseline vs EM vs EM without CRF vs true masks; resumes a stopped "
                        "run in the same --out with the same weights and settings")
    ev.add_argument("--model", default=str(SHIPPED_MODEL))
    ev.add_argument("--out", required=True)
    ev.add_argument("--scenes", type=int, default=30)
    ev.add_argument("--steps", type=int, default=200)
    ev.add_argument("--refresh", type=int, default=25)
    ev.add_argument("--mask-timesteps", type=int, default=50, help="timesteps of the first mask estimate")
    ev.add_argument("--refresh-timesteps", type=int, default=30, help="timesteps of each refresh (em methods)")
    ev.add_argument("--gen-images", type=int, default=2)
    ev.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of the read-back images "
                    "(4.0, as the tiny worlds' own samples; `generate` and the nodes default to Break-A-Scene's 7.5)")
    ev.add_argument("--checker", default=None, help="default: MODEL/checker.safetensors")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--lr", type=float, default=_defaults().lr, help="every method's token learning rate "
                    "(default: the engine's, Break-A-Scene's stage 1)")
    ev.add_argument("--step-prompt", choices=("bas", "image"), default=_defaults().step_prompt,
                    help="every method's step prompt wording (learn --step-prompt)")
    ev.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (default: all)")
    ev.add_argument("--quality-images", type=int, default=48, help="captions generated for the model's own quality")
    ev.set_defaults(func=cmd_evaluate)

    d = _defaults()
    l = sub.add_parser("learn", help="learn concept tokens and masks from images")
    l.add_argument("--model", required=True, help="diffusers-format model folder or single .safetensors file")
    l.add_argument("--prediction-type", **PREDICTION_TYPE)
    l.add_argument("--image", action="append", default=[], help="repeat; each followed by its --prompt")
    l.add_argument("--prompt", action="append", default=[], help='e.g. "a photo of [v1] and [v2]"')
    l.add_argument("--init", action="append", default=[], help='"[v1]=man": start a token from a word')
    l.add_argument("--mask", action="append", default=[], help='"[v2]=M.png" or "[v2]@2=M.png": a fixed user mask')
    l.add_argument("--steps", type=int, default=d.steps,
                   help="EM steps this command runs (after --warmup-steps), as an EM Token Step node's steps: on an "
                        "OUT with a finished run, that many more; an interrupted run is finished by the same command")
    l.add_argument("--out", required=True)
    l.add_argument("--lr", type=float, default=d.lr)
    l.add_argument("--attn-weight", type=float, default=d.attn_weight)
    l.add_argument("--refresh-every", type=int, default=d.refresh_every, help="0: masks from attention once")
    l.add_argument("--mask-timesteps", type=int, default=d.mask_timesteps, help="timesteps of the first mask estimate")
    l.add_argument("--refresh-timesteps", type=int, default=d.refresh_timesteps, help="timesteps of each later refresh")
    l.add_argument("--timestep-sampling", choices=["stratified", "uniform"], default=d.timestep_sampling,
                   help="one timestep per equal slice of the schedule, or independent draws")
    l.add_argument("--threshold", type=float, default=d.threshold)
    l.add_argument("--no-crf", action="store_true")
    l.add_argument("--crf-preset", choices=sorted(PRESETS), default=d.crf.preset_name() or "cutler",
                   help="DenseCRF pairwise settings: CutLER's (the paper's) or DeepLab-v2's")
    l.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    l.add_argument("--no-flip", action="store_true")
    l.add_argument("--mask-layers", choices=["coarse", "all"], default=None,
                   help=f"layers whose maps make the masks (default {d.mask_layers}: every layer, as the paper)")
    l.add_argument("--loss-layers", choices=["coarse", "all"], default=None,
                   help=f"layers the attention loss reads (default {d.loss_layers}: Break-A-Scene's 16x16 at 512 px)")
    l.add_argument("--layers", choices=["coarse", "all"], default=None, help="both of the above at once")
    l.add_argument("--background", default=None,
                   help="a concept, e.g. [v3], whose mask is what no other concept claims")
    l.add_argument("--mask-t-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="draw mask-estimate timesteps from [LO, HI) only (default: the whole schedule)")
    l.add_argument("--mask-stickiness", type=float, default=d.mask_stickiness,
                   help="weight in [0, 1) of a refresh's previous masks in what it thresholds (0: the paper)")
    l.add_argument("--exclusive-masks", action="store_true",
                   help="a pixel several thresholded maps claim goes to the concept it attends to most; a concept "
                        "left with little looks again where no other is (default: the CRF settles overlaps)")
    l.add_argument("--fill-lost", action="store_true",
                   help="a concept whose mask comes out under 1%% of the image takes the object-sized region no "
                        "concept claims (default: it keeps its few pixels)")
    l.add_argument("--share-parts", action="store_true",
                   help="a concept still under 1%% of the image takes the part of another concept's mask where its "
                        "share of the two maps is highest (default: it stays empty)")
    l.add_argument("--restart-moved", type=float, default=d.restart_moved,
                   help="at a refresh, a concept whose mask moved by more than this (1 - IoU, in [0, 1)) starts again "
                        "from its initial vector (default 0: never)")
    l.add_argument("--no-shuffle", action="store_true",
                   help="each step's prompt keeps the image prompt's concept order (default: shuffled, as BaS)")
    l.add_argument("--step-prompt", choices=("bas", "image"), default=d.step_prompt,
                   help="each step's prompt: 'bas', \"a photo of [v1] and [v3]\" (default, as BaS), or 'image', the image "
                        "prompt's words with the concepts not drawn cut out, in its order (\"a photo of [v1] on [v3]\")")
    l.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="log the loss on fixed noise and timesteps every N steps (0: never)")
    l.add_argument("--resolution", type=int, default=None,
                   help="working side in pixels (default: the model's own: 512 for SD 1.x and SD 2.x-base, "
                        "768 for SD 2.x 768-v)")
    l.add_argument("--seed", type=int, default=d.seed)
    l.add_argument("--save-every", type=int, default=d.save_every)
    l.add_argument("--device", default="cpu")
    l.add_argument("--quiet", action="store_true")
    l.set_defaults(func=cmd_learn)
    return p


def _defaults():
    from .config import LearnConfig

    return LearnConfig()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, RunLocked) as exc:  # OSError: unreadable inputs, unwritable outputs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        release_held()  # the run folder a command held
