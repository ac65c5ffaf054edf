"""The tiny world's evaluation: does EM beat masks-from-attention-once, and by how much does
DenseCRF help? Over a fixed, seeded held-out set of scenes (2-4 concepts each, held-out shapes
included), concepts are learned with

  baseline    masks from attention once, never refreshed (the paper's baseline)
  em          masks re-estimated every R steps from new U-Net passes over random timesteps, with
              DenseCRF (the paper's method, the default: 30 stratified timesteps per refresh)
  em_50_independent  the same over 50 independent timesteps at every estimate (the paper's
              sampling, and this pack's default before issue 6)
  em_no_crf   the same without DenseCRF
  em_exclusive  EM with exclusive masks and the image prompt's concept order (options, not defaults)
  em_exclusive_fill  the same, a lost concept taking the region no concept claims (`fill_lost`)
  em_exclusive_share  the same, a concept still lost taking the part of another's mask it attends to most (`share_parts`)
  em_exclusive_restart  em_exclusive_fill, a concept whose mask moved at a refresh starting again (`restart_moved`)
  true_masks  the scenes' exact masks, fixed (Break-A-Scene; the upper bound)

(em_step_maps, refreshes from the maps the token steps already computed, was measured worse, 0.279
against 0.368, in docs/history/tiny_world_eval/report.md, before issue 15; that option was removed in issue 18.)

and the report gives the mask IoU against the truth per method and per refresh (a Fig. 3-style
plot) and the fidelity of images generated from each learned object concept, judged by the
checker (colour and shape read back from the render).

    python -m em_core evaluate --model em_core/tiny_world/model --out eval-out [--scenes 30 --steps 200]

Each finished scene is saved in the output folder (partial.json); the same command again, or with
more --scenes, resumes after the last finished scene when the weights and settings are the same, so
a 30-scene evaluation can span several sittings.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import inside, prepare_out, write_atomic, write_json
from ..attention import AttentionCapture
from ..config import LearnConfig
from ..dataset import prepare_image
from ..em_loop import learn, start_state
from ..generate import generate
from ..masks import estimate_masks, iou, normalise
from ..metrics import final_matching, matched, mean_iou_curve
from ..plot import line_chart
from ..provenance import begin, provenance
from .scenes import HELD_OUT_SHAPES, SHAPES, random_scene

RANDOM_INIT = "_random_init"
METHODS = ("baseline", "em", "em_50_independent", "em_no_crf", "em_background", "em_exclusive",
           "em_exclusive_fill", "em_exclusive_share", "em_exclusive_restart", "true_masks", "true_masks_random_init",
           "baseline_random_init", "em_exclusive_fill_random_init")
# X_random_init: method X with every token (the background's too) started at random rather than from
# its word, so nothing tells the object concepts apart (gate 4's entangled case, gate 3's random init);
# em_background: EM with the background concept taken as what no object claims (LearnConfig.background);
# em_exclusive: EM with exclusive masks and each step's concepts in the image prompt's order
# (LearnConfig.exclusive_masks, shuffle=False), the best pair measured on the research world (issue 14);
# em_exclusive_fill: the pair with LearnConfig.fill_lost; em_exclusive_share: and LearnConfig.share_parts;
# em_exclusive_restart: em_exclusive_fill with LearnConfig.restart_moved at RESTART_MOVED.
RESTART_MOVED = 0.5


def entangled_scene(seed: int):
    """Two objects of one shape (both tokens start from that word): only EM's masks can tell them apart."""
    from .scenes import BACKGROUNDS, COLOURS, SceneObject, render

    rng = np.random.default_rng(seed)
    for _ in range(50):
        shape = str(rng.choice(list(SHAPES)))
        c1, c2 = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
        scene = render([SceneObject(c1, shape), SceneObject(c2, shape)], str(rng.choice(BACKGROUNDS)), 64,
                       seed=int(rng.integers(1 << 31)))
        if min(m.sum() for k, m in scene.masks.items() if k != scene.background) >= 0.06 * 64 * 64 * 0.8:
            return scene
    return scene


def eval_set(n: int, seed: int = 20_000) -> list:
    """n scenes with 1-3 objects plus the background as a concept: 2-4 concepts each; every fourth
    scene is entangled (two objects of one shape)."""
    return [entangled_scene(seed + i) if i % 4 == 3 else
            random_scene(seed + i, n_objects=1 + i % 3, shapes=SHAPES, max_overlap=0.2) for i in range(n)]


def concept_task(scene):
    """Prompt, init words and true masks of a scene, its objects as [v1].. and its background last."""
    objects = [k for k in scene.masks if k != scene.background]
    names = [f"[v{i + 1}]" for i in range(len(objects) + 1)]
    prompt = "a photo of " + " and ".join(names[:-1]) + f" on {names[-1]}"
    init = {n: o.shape for n, o in zip(names, scene.objects)}
    init[names[-1]] = scene.background
    truth = {n: scene.masks[k] for n, k in zip(names, objects + [scene.background])}
    info = {n: {"colour": o.colour, "shape": o.shape, "held_out": o.shape in HELD_OUT_SHAPES}
            for n, o in zip(names, scene.objects)}
    return prompt, init, truth, info


def interchangeable(init: dict, objects: list, random_init: bool) -> list:
    """Groups of object concepts nothing tells apart (one init word for several, or random init
    for all): which of them lands on which object is arbitrary, so their IoU is scored under the
    best matching (`metrics.matched`), and their generated images read back against the objects that
    matching gives them; every other concept keeps the identity its init word gave it."""
    if random_init:
        return [list(objects)] if len(objects) > 1 else []
    by_word = {}
    for n in objects:
        by_word.setdefault(init.get(n), []).append(n)
    return [g for g in by_word.values() if len(g) > 1]


def _method_config(method: str, steps: int, refresh: int, timesteps: int, seed: int,
                   refresh_timesteps: int = LearnConfig.refresh_timesteps, background: str | None = None,
                   lr: float = LearnConfig.lr, step_prompt: str = LearnConfig.step_prompt) -> LearnConfig:
    kw = dict(steps=steps, mask_timesteps=timesteps, seed=seed, lr=lr, step_prompt=step_prompt, save_every=10 ** 9)
    method = method.removesuffix(RANDOM_INIT)
    if method in ("baseline", "true_masks"):
        return LearnConfig(refresh_every=0, **kw)
    if method == "em_background":
        return LearnConfig(refresh_every=refresh, refresh_timesteps=refresh_timesteps, background=background, **kw)
    if method in ("em_exclusive", "em_exclusive_fill", "em_exclusive_share", "em_exclusive_restart"):
        return LearnConfig(refresh_every=refresh, refresh_timesteps=refresh_timesteps, exclusive_masks=True,
                           shuffle=False, fill_lost=method != "em_exclusive", share_parts=method == "em_exclusive_share",
                           restart_moved=RESTART_MOVED if method == "em_exclusive_restart" else 0.0, **kw)
    if method == "em_50_independent":
        return LearnConfig(refresh_every=refresh, refresh_timesteps=timesteps, timestep_sampling="uniform", **kw)
    return LearnConfig(refresh_every=refresh, use_crf=(method != "em_no_crf"), refresh_timesteps=refresh_timesteps,
                       **kw)


@torch.no_grad()
def word_attention_iou(bundle, scenes, timesteps: int = 20, threshold: float = 0.5) -> dict:
    """How well the model's own words land on their objects: the shape word's cross-attention map
    (averaged over timesteps, thresholded) against the object's true mask; chance = its area."""
    tok, ious, chance = bundle.tokenizer, [], []
    gen = torch.Generator().manual_seed(0)
    with AttentionCapture(bundle.unet) as cap:
        for scene in scenes:
            img = prepare_image(bundle, None, "[v1]", pil=scene.image, flip=False)
            ids = tok(scene.caption, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            hidden = bundle.text_encoder(ids)[0]
            for obj, key in zip(scene.objects, [k for k in scene.masks if k != scene.background]):
                if obj.shape in HELD_OUT_SHAPES:
                    continue
                shape_id = tok.convert_tokens_to_ids(obj.shape + "</w>")
                if shape_id == tok.unk_token_id:  # a model that does not know the word
                    continue
                # The shape word of this object: the first occurrence after its colour word.
                words = ids[0].tolist()
                pos = [i for i, t in enumerate(words) if t == shape_id]
                if not pos:
                    continue
                sel = torch.zeros(1, ids.shape[1], 1)
                sel[0, pos[0], 0] = 1.0
                t = torch.randint(0, 1000, (timesteps,), generator=gen)
                z = img.latent_mean[:1].expand(timesteps, -1, -1, -1)
                noisy = bundle.scheduler.add_noise(z, torch.randn(z.shape, generator=gen), t)
                _, maps = cap.run(sel.expand(timesteps, -1, -1), img.latent_hw,
                                  lambda: bundle.unet(noisy, t, encoder_hidden_states=hidden.expand(timesteps, -1, -1)))
                m = normalise(maps.mean(0))[0]
                up = torch.nn.functional.interpolate(m[None, None], size=scene.masks[key].shape, mode="bilinear")[0, 0]
                ious.append(iou(up.numpy() > threshold, scene.masks[key]))
                chance.append(float(scene.masks[key].mean()))
    return {"iou": _mean(ious), "chance": _mean(chance), "objects": len(ious)}


READBACK_BACKGROUNDS = ("grass", "sand", "snow")  # what generated images for the checker stand on


def caption_fidelity(bundle, checker, n: int = 48, seed: int = 50_000, steps: int = 25, guidance: float = 4.0) -> dict:
    """Single-object captions of seen shapes, generated, read back by the checker."""
    from .checker import judge
    from .scenes import COLOURS, TRAIN_SHAPES

    rng = np.random.default_rng(seed)
    ok_c, ok_s = [], []
    for i in range(n):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(TRAIN_SHAPES)))
        bg = rng.choice(list(READBACK_BACKGROUNDS))
        img = generate(bundle, f"a {colour} {shape} on {bg}", seed=seed + i, steps=steps, guidance=guidance,
                       progress=False)[0]
        c, s = judge(checker, [img])[0]
        ok_c.append(c == colour)
        ok_s.append(s == shape)
    return {"colour": float(np.mean(ok_c)), "shape": float(np.mean(ok_s)), "n": n}


def read_back(bundle, checker, state, info: dict, n: int, steps: int, guidance: float, seed: int,
              weights=None, template: str = "a photo of {name}",
              words: dict | None = None, negative: str = "") -> list[tuple[bool, bool, bool]]:
    """(colour right, shape right, held-out shape) per generated image of each object concept, as the
    checker reads them: the evaluation's fidelity, and benchmarks/concept_fidelity.py's other forms.
    A template with {bg} puts image j on READBACK_BACKGROUNDS[j % 3] (one image per call, seed + j).
    `words`: concept -> its real words ("a red striped circle") in place of the token (the ceiling).
    `negative`: the negative prompt; its {others} becomes the scene's other object concepts, so a
    fine-tune that learned its concept's neighbours can be told not to draw them."""
    from .checker import judge

    out = []
    concepts = None if words else state.concepts
    texts = {n: words[n] if words else n for n in info}
    for name, facts in info.items():
        text = texts[name]
        neg = negative.format(others=", ".join(t for o, t in texts.items() if o != name))
        if "{bg}" in template:
            bgs = READBACK_BACKGROUNDS
            images = [generate(bundle, template.format(name=text, bg=bgs[j % len(bgs)]), negative=neg,
                               concepts=concepts, weights=weights, seed=seed + j, n=1, steps=steps,
                               guidance=guidance, progress=False)[0] for j in range(n)]
        else:
            images = generate(bundle, template.format(name=text), negative=neg, concepts=concepts,
                              weights=weights, seed=seed, n=n, steps=steps, guidance=guidance, progress=False)
        out += [(c == facts["colour"], s == facts["shape"], facts["held_out"]) for c, s in judge(checker, images)]
    return out


def evaluate(model: str, out: str | Path, scenes: int = 30, steps: int = 200, refresh: int = 25,
             timesteps: int = 50, refresh_timesteps: int = LearnConfig.refresh_timesteps, gen_images: int = 2,
             gen_steps: int = 25, guidance: float = 4.0, checker_path: str | None = None, seed: int = 0,
             quality_images: int = 48, methods=METHODS, lr: float = LearnConfig.lr,
             step_prompt: str = LearnConfig.step_prompt, log=print) -> dict:
    from .checker import load_checker
    from ..model_io import load_bundle

    begin()
    out = prepare_out(out)
    bundle = load_bundle(model)
    checker = load_checker(checker_path or Path(model) / "checker.safetensors")
    t0 = time.time()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    results = {m: {"final_iou": [], "curves": [], "fid_colour": [], "fid_shape": [], "fid_held_out_shape": [],
                   "own_attention_iou": [], "final_iou_any_match": []} for m in methods}
    per_scene = []
    key = dict(weights=weights_fingerprint(model), checker=weights_fingerprint(checker_path or Path(model) / "checker.safetensors"),
               methods=list(methods), steps=steps, refresh=refresh, timesteps=timesteps,
               refresh_timesteps=refresh_timesteps, gen_images=gen_images, gen_steps=gen_steps, guidance=guidance,
               seed=seed, readback="as matched")  # scenes read back by identity (before 2026-12-06) are not reused
    if lr != LearnConfig.lr:  # named only when set, so runs begun before the option still resume
        key["lr"] = lr
    if step_prompt != LearnConfig.step_prompt:
        key["step_prompt"] = step_prompt
    done = _resume(out, key, scenes, log)
    before = 0.0  # seconds an earlier, resumed run spent on its scenes
    if done:
        results, per_scene, before = done["results"], done["scenes"], done.get("seconds", 0.0)
    held_out = eval_set(scenes)
    for k, scene in enumerate(held_out):
        if k < len(per_scene):
            continue
        prompt, init, truth, info = concept_task(scene)
        path = inside(out, f"scenes/scene{k:02d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.image.save(path)
        img = prepare_image(bundle, path, prompt)
        row = {"scene": k, "caption": scene.caption, "prompt": prompt}
        for method in methods:
            oracle = method.startswith("true_masks")
            fixed = {(0, n): m for n, m in truth.items()} if oracle else None
            cfg = _method_config(method, steps, refresh, timesteps, seed, refresh_timesteps, img.names[-1], lr, step_prompt)
            random_init = method.endswith(RANDOM_INIT)
            state = learn(bundle, [img], start_state(bundle, [img], cfg, {} if random_init else init, fixed),
                          progress=False)
            groups = interchangeable(init, list(info), random_init)
            if oracle:  # the headroom: masks from the trained tokens' own attention, as EM would estimate them
                own, _ = estimate_masks(bundle, state.concepts, img, n_timesteps=timesteps, batch=cfg.mask_batch,
                                        crf_params=cfg.crf, generator=torch.Generator().manual_seed(seed),
                                        layers=cfg.mask_layers)
                est = {n: m > 0.5 for n, m in zip(img.names, own)}
                scores = matched(est, {n: _resized(truth[n], est[n].shape) for n in img.names}, groups)
                results[method]["own_attention_iou"].append(float(np.mean(list(scores.values()))))
            true = {(0, n): m for n, m in truth.items()}
            means = mean_iou_curve(state, true, groups)
            results[method]["final_iou_any_match"].append(mean_iou_curve(state, true, [list(info)])[-1][1])
            results[method]["curves"].append(means)
            results[method]["final_iou"].append(means[-1][1])
            # Judged against the object its mask ended on: in a group nothing tells apart, as its IoU is.
            match = final_matching(state, true, groups)
            fid = read_back(bundle, checker, state, {n: info[match[n]] for n in info}, n=gen_images,
                            steps=gen_steps, guidance=guidance, seed=seed)
            results[method]["fid_colour"] += [f[0] for f in fid]
            results[method]["fid_shape"] += [f[1] for f in fid if not f[2]]
            results[method]["fid_held_out_shape"] += [f[1] for f in fid if f[2]]
            row[method] = {"final_iou": means[-1][1], "curve": means, "groups": groups,
                           "final_iou_any_match": results[method]["final_iou_any_match"][-1]}
        per_scene.append(row)
        write_json(inside(out, PARTIAL), {"key": key, "results": results, "scenes": per_scene,
                                          "seconds": before + time.time() - t0})
        log(f"scene {k + 1}/{scenes} ({time.time() - t0:.0f}s): " +
            "  ".join(f"{m} {row[m]['final_iou']:.3f}" for m in methods))
    summary = _summary(results, steps, refresh)
    summary["model_quality"] = {"word_attention": word_attention_iou(bundle, held_out),
                                "caption_fidelity": caption_fidelity(bundle, checker, n=quality_images,
                                                                     steps=gen_steps, guidance=guidance)}
    summary["settings"] = dict(model=str(model), scenes=scenes, steps=steps, refresh=refresh, timesteps=timesteps,
                               refresh_timesteps=refresh_timesteps, lr=lr, step_prompt=step_prompt,
                               gen_images=gen_images, gen_steps=gen_steps, guidance=guidance, seed=seed,
                               seconds=round(before + time.time() - t0))
    write_json(inside(out, "results.json"), {"summary": summary, "scenes": per_scene,
                                            **provenance(config=summary["settings"])})
    chart = line_chart({m: summary["curve"][m] for m in methods if not m.startswith("true_masks")},
                       title=f"mask IoU vs truth, mean of {scenes} scenes", xlabel="EM step", ylabel="IoU")
    write_atomic(inside(out, "iou_curve.png"), lambda tmp: chart.save(tmp, format="PNG"))
    write_atomic(inside(out, "report.md"), lambda tmp: Path(tmp).write_text(report_markdown(summary)))
    return summary


PARTIAL = "partial.json"  # the scenes done so far, so a stopped evaluation resumes where it stopped


def weights_fingerprint(path) -> str:
    """sha256 over a model folder's (or a file's) safetensors, so a resumed evaluation never mixes
    two sets of weights."""
    import hashlib

    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _resume(out: Path, key: dict, scenes: int, log) -> dict | None:
    """The scenes an earlier run of the same evaluation (same weights and settings) finished in this
    folder: eval_set's scenes are a seeded prefix, so they are the first scenes of any longer run too."""
    path = out / PARTIAL
    if not path.is_file():
        return None
    import json

    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if done.get("key") != key:
        log(f"{path} holds another evaluation (other weights or settings); starting afresh")
        return None
    if len(done["scenes"]) > scenes:
        log(f"{path} holds more scenes than the {scenes} asked for; starting afresh")
        return None  # its per-image fidelity lists cannot be cut back to a prefix
    log(f"resuming: {len(done['scenes'])} scene(s) already done in {path}")
    return done


def _resized(mask: np.ndarray, shape) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)) > 127


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else float("nan")


def _summary(results: dict, steps: int, refresh: int) -> dict:
    grid = sorted({s for m in results.values() for c in m["curves"] for s, _ in c} | {steps})
    curve = {}
    for m, r in results.items():
        pts = []
        for s in grid:
            vals = [next((v for st, v in reversed(c) if st <= s), c[0][1]) for c in r["curves"]]
            pts.append((s, _mean(vals)))
        curve[m] = pts
    table = {m: {"mask_iou": _mean(r["final_iou"]), "mask_iou_any_match": _mean(r["final_iou_any_match"]),
                 "fid_colour": _mean(r["fid_colour"]),
                 "fid_shape_seen": _mean(r["fid_shape"]), "fid_shape_held_out": _mean(r["fid_held_out_shape"]),
                 "first_iou": _mean([c[0][1] for c in r["curves"]]),
                 "own_attention_iou": _mean(r["own_attention_iou"])}
             for m, r in results.items()}
    return {"table": table, "curve": curve}


def report_markdown(summary: dict) -> str:
    s, t = summary["settings"], summary["table"]
    lines = [
        "# Tiny world evaluation", "",
        f"{s['scenes']} held-out scenes, {s['steps']} token steps per method, masks estimated first from "
        f"{s['timesteps']} timesteps and refreshed every {s['refresh']} steps from {s['refresh_timesteps']} "
        f"(stratified; em_50_independent: {s['timesteps']} independent draws at every estimate); fidelity from "
        f"{s['gen_images']} images per object concept ({s['gen_steps']} DDIM steps, guidance {s['guidance']}), "
        f"read back by the checker. Took {s['seconds']} s.",
        "Mask IoU keeps the identity each concept's init word gives it, except among concepts nothing tells "
        "apart (one init word for two objects, or random init), scored under their best matching, and each "
        "concept's images are read back against the object that matching gives it; "
        "\"any matching\" scores every scene's object concepts under their best matching.",
        "", "| method | mask IoU | mask IoU, any matching | colour right | shape right (seen shapes) | "
        "shape right (held-out shapes) |",
        "|---|---|---|---|---|---|",
    ]
    for m, row in t.items():
        lines.append(f"| {m} | {row['mask_iou']:.3f} | {row.get('mask_iou_any_match', float('nan')):.3f} | "
                     f"{row['fid_colour']:.3f} | {row['fid_shape_seen']:.3f} | {row['fid_shape_held_out']:.3f} |")
    oracles = [m for m in t if m.startswith("true_masks")]
    if oracles and "baseline" in t:
        lines += ["", "Headroom: masks from the trained tokens' own attention (as EM estimates them) against the "
                  "first estimate from untrained tokens (the baseline's), mean IoU:", ""]
        lines += [f"- {m}: {t[m]['own_attention_iou']:.3f} vs {t['baseline']['first_iou']:.3f} "
                  f"({t[m]['own_attention_iou'] - t['baseline']['first_iou']:+.3f})" for m in oracles]
    lines += ["", "Mean mask IoU against the truth at each refresh (the curve in `iou_curve.png`):", "",
              "| step | " + " | ".join(m for m in summary["curve"]) + " |",
              "|---|" + "---|" * len(summary["curve"])]
    steps = [p[0] for p in next(iter(summary["curve"].values()))]
    for i, st in enumerate(steps):
        lines.append(f"| {st} | " + " | ".join(f"{summary['curve'][m][i][1]:.3f}" for m in summary["curve"]) + " |")
    q = summary["model_quality"]
    lines += ["", "## The model itself", "",
              f"- Cross-attention of a shape word on its object: IoU {q['word_attention']['iou']:.3f} against "
              f"{q['word_attention']['chance']:.3f} for chance (the object's area), over "
              f"{q['word_attention']['objects']} objects.",
              f"- Single-object captions generated and read back: colour right {q['caption_fidelity']['colour']:.3f}, "
              f"shape right {q['caption_fidelity']['shape']:.3f} ({q['caption_fidelity']['n']} images).", ""]
    return "\n".join(lines)
