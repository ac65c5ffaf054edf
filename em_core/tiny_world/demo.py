"""The demo: the engine's main job on the shipped tiny-world model (`python -m em_core demo`)."""
from __future__ import annotations

from pathlib import Path

from . import SHIPPED_MODEL


def run_demo(out: str | Path, scene: int = 3, steps: int = 100, seed: int = 0, progress: bool = True):
    """The main job on the embedded default model: learn the concepts of a tiny-world scene with
    EM, generate with them, and write masks, images and the mask IoU curve against the truth."""
    from PIL import Image

    from ..atomic import inside, prepare_out, write_atomic, write_json
    from ..config import LearnConfig
    from ..dataset import prepare_image
    from ..em_loop import learn, start_state
    from ..generate import generate
    from ..metrics import iou_curve, mean_iou
    from ..model_io import load_bundle
    from ..plot import line_chart
    from .evaluate import concept_task
    from .scenes import random_scene
    from .tiny_model import build_model

    out = prepare_out(out)
    if (SHIPPED_MODEL / "model_index.json").is_file():
        bundle = load_bundle(SHIPPED_MODEL)
    else:
        print("note: the shipped tiny-world model is missing; using a random tiny model (masks mean nothing)")
        bundle = build_model("tiny", seed=seed)
    picture = random_scene(scene, n_objects=2, max_overlap=0.1)
    prompt, init, truth, _ = concept_task(picture)
    path = inside(out, "input.png")
    picture.image.save(path)
    for name, m in truth.items():
        Image.fromarray(m.astype("uint8") * 255).save(inside(out, f"true_{name[1:-1]}.png"))
    image = prepare_image(bundle, path, prompt)
    print(f"scene: {picture.caption}\nprompt: {prompt}  (init words {init})")
    config = LearnConfig(steps=steps, refresh_every=max(1, steps // 4), mask_timesteps=50, seed=seed)
    state = start_state(bundle, [image], config, init)
    state = learn(bundle, [image], state, out=inside(out, "run"), progress=progress)
    curve = iou_curve(state, {(0, n): m for n, m in truth.items()})
    write_json(inside(out, "iou_curve.json"), curve)
    chart = line_chart({"EM": [(c["step"], mean_iou(c)) for c in curve]}, title="mask IoU vs truth",
                       xlabel="EM step", ylabel="IoU", ylim=(0, 1))
    write_atomic(inside(out, "iou_curve.png"), lambda tmp: chart.save(tmp, format="PNG"))
    for entry in curve:
        print(f"step {entry['step']:4d}  mean mask IoU vs truth {mean_iou(entry):.3f}")
    names = state.concepts.names
    prompts = [prompt, f"a photo of {names[0]} on snow", f"a photo of {names[-2]} and {names[0]} on {names[-1]}"]
    for k, p in enumerate(prompts):
        imgs = generate(bundle, p, concepts=state.concepts, seed=seed, n=2, steps=25, guidance=4.0,
                        progress=False)
        for i, im in enumerate(imgs):
            write_atomic(inside(out, f"generated/{k}_{i}.png"), lambda tmp, im=im: im.save(tmp, format="PNG"))
        print(f"generated: {p!r} -> {out / 'generated'}/{k}_*.png")
    print(f"{state.status}: masks in {out / 'run' / 'masks'}, IoU curve in {out / 'iou_curve.png'}")
    return state
