import json
from pathlib import Path

import numpy as np
import pytest
import torch

from em_core.tiny_world.checker import Checker, judge, load_checker, save_checker
from em_core.plot import line_chart
from em_core.tiny_world.scenes import HELD_OUT_SHAPES, SHAPES, SceneObject, random_scene, render

SHIPPED = Path(__file__).resolve().parents[1] / "em_core" / "tiny_world" / "model"


def test_scenes_are_seeded_and_masks_are_exact_and_disjoint():
    a, b = random_scene(5), random_scene(5)
    assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert random_scene(6).caption != a.caption or not np.array_equal(np.asarray(random_scene(6).image),
                                                                       np.asarray(a.image))
    stack = np.stack(list(a.masks.values()))
    assert (stack.sum(0) == 1).all()  # every pixel belongs to exactly one object or the background
    for s in range(40):
        scene = random_scene(s)
        assert all(o.shape not in HELD_OUT_SHAPES for o in scene.objects)
        assert scene.caption.endswith(f"on {scene.background}") and 1 <= len(scene.objects) <= 4


def test_render_paints_each_object_where_its_mask_is():
    scene = render([SceneObject("red", "square"), SceneObject("blue", "star", "dotted")], "snow", seed=1,
                   boxes=[(4, 4, 30, 30), (20, 20, 60, 60)])
    img = np.asarray(scene.image)
    red = scene.masks["a red square"]
    assert red.any() and (img[red][:, 0] > 150).all() and (img[red][:, 2] < 100).all()
    star = scene.masks["a blue dotted star"]
    assert not (red & star).any() and star[40, 40]
    assert scene.caption == "a red square and a blue dotted star on snow"
    with pytest.raises(ValueError, match="unknown"):
        render([SceneObject("red", "hexagon")])
    assert set(SHAPES) >= set(HELD_OUT_SHAPES)


def test_checker_round_trip_and_reading(tmp_path):
    torch.manual_seed(0)
    net = Checker()
    save_checker(net, tmp_path / "c.safetensors", {"colour": 0.1})
    again = load_checker(tmp_path / "c.safetensors")
    imgs = [random_scene(1).image, random_scene(2).image]
    assert judge(net.eval(), imgs) == judge(again, imgs)


@pytest.mark.skipif(not (SHIPPED / "checker.safetensors").is_file(), reason="the shipped checker is missing")
def test_the_shipped_checker_reads_colour_and_shape_in_that_order():
    """judge gives (colour, shape) of each image's object: checked on renders whose answer is known,
    not by the length of the pair (any pair has length 2)."""
    checker = load_checker(SHIPPED / "checker.safetensors")
    objects = [SceneObject("red", "circle"), SceneObject("blue", "square"), SceneObject("green", "triangle"),
               SceneObject("yellow", "star", "dotted")]
    images = [render([o], "snow", 64, seed=i).image for i, o in enumerate(objects)]
    assert judge(checker, images) == [(o.colour, o.shape) for o in objects]


def test_line_chart_draws_every_series():
    img = line_chart({"em": [(0, 0.2), (50, 0.4)], "baseline": [(0, 0.2), (50, 0.2)]}, title="t")
    arr = np.asarray(img)
    assert img.size == (640, 400)
    assert ((arr == (31, 119, 180)).all(-1)).sum() > 50 and ((arr == (255, 127, 14)).all(-1)).sum() > 50


def test_evaluation_runs_every_method_and_writes_its_report(tiny_dir, tmp_path):
    from em_core.tiny_world.evaluate import METHODS, _method_config, concept_task, eval_set, evaluate

    scenes = eval_set(6)
    assert [len(s.objects) for s in scenes] == [1, 2, 3, 2, 2, 3]
    assert scenes[3].objects[0].shape == scenes[3].objects[1].shape  # entangled: one init word for both
    prompt, init, truth, info = concept_task(scenes[2])
    assert prompt == "a photo of [v1] and [v2] and [v3] on [v4]" and set(truth) == {"[v1]", "[v2]", "[v3]", "[v4]"}
    assert init["[v4]"] == scenes[2].background and set(info) == {"[v1]", "[v2]", "[v3]"}
    torch.manual_seed(0)
    save_checker(Checker(), tmp_path / "checker.safetensors", {})
    summary = evaluate(str(tiny_dir), tmp_path / "ev", scenes=1, steps=2, refresh=1, timesteps=2, refresh_timesteps=2, gen_images=1,
                       gen_steps=2, checker_path=str(tmp_path / "checker.safetensors"), quality_images=2,
                       log=lambda *a: None)
    assert set(summary["table"]) == set(METHODS)
    for m in ("baseline", "em_exclusive_fill", "true_masks"):  # same run settings; only the start differs
        assert _method_config(m + "_random_init", 2, 1, 2, 0) == _method_config(m, 2, 1, 2, 0)
    assert _method_config("em_exclusive_fill", 2, 1, 2, 0, step_prompt="image").step_prompt == "image"
    assert summary["table"]["baseline_random_init"]["first_iou"] != summary["table"]["baseline"]["first_iou"]
    assert summary["table"]["true_masks"]["mask_iou"] == 1.0
    for m in ("true_masks", "true_masks_random_init"):
        assert 0.0 <= summary["table"][m]["own_attention_iou"] <= 1.0
    assert summary["table"]["baseline"]["first_iou"] == summary["table"]["baseline"]["mask_iou"]
    assert [s for s, _ in summary["curve"]["em"]] == [0, 1, 2]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| em |" in report and "| baseline |" in report and "Headroom" in report and "any matching" in report
    for m in METHODS:
        assert summary["table"][m]["mask_iou_any_match"] >= summary["table"][m]["mask_iou"] - 1e-9
    assert (tmp_path / "ev" / "iou_curve.png").is_file() and (tmp_path / "ev" / "scenes" / "scene00.png").is_file()


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="the shipped tiny-world model is missing")
def test_the_shipped_model_learns_and_generates(tmp_path):
    from em_core.config import LearnConfig
    from em_core.dataset import prepare_image
    from em_core.em_loop import learn, start_state
    from em_core.tiny_world.evaluate import concept_task
    from em_core.generate import generate
    from em_core.model_io import load_bundle

    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 30 * 1024 * 1024 and (SHIPPED / "README.md").is_file() and (SHIPPED / "samples.png").is_file()
    bundle = load_bundle(SHIPPED)
    assert bundle.default_resolution == 64 and "circle</w>" in bundle.tokenizer.get_vocab()
    scene = random_scene(3, n_objects=2)
    prompt, init, truth, _ = concept_task(scene)
    scene.image.save(tmp_path / "s.png")
    img = [prepare_image(bundle, tmp_path / "s.png", prompt)]
    start = start_state(bundle, img, LearnConfig(steps=3, refresh_every=2, mask_timesteps=8), init)
    first = start.concepts.vectors.clone()
    state = learn(bundle, img, start, progress=False)
    assert state.status == "done" and len(state.mask_history) == 2
    out = generate(bundle, "a photo of [v1] on snow", concepts=state.concepts, steps=5, progress=False)
    assert out[0].size == (64, 64)
    # The three steps moved the vectors, and what generate draws follows them (not the pair the checker
    # reads from it: any reading is a pair).
    assert not torch.equal(state.concepts.vectors, first)
    unlearned = type(state.concepts)(state.concepts.names, state.concepts.init_words, first)
    before = generate(bundle, "a photo of [v1] on snow", concepts=unlearned, steps=5, progress=False)
    assert not np.array_equal(np.asarray(out[0]), np.asarray(before[0]))


def test_a_stopped_evaluation_resumes_from_its_finished_scenes(tiny_dir, tmp_path, monkeypatch):
    import em_core.tiny_world.evaluate as ev

    torch.manual_seed(0)
    save_checker(Checker(), tmp_path / "checker.safetensors", {})
    kw = dict(steps=1, refresh=1, timesteps=2, refresh_timesteps=2, gen_images=1, gen_steps=1, quality_images=1,
              checker_path=str(tmp_path / "checker.safetensors"), methods=("baseline",))
    first = ev.evaluate(str(tiny_dir), tmp_path / "ev", scenes=1, log=lambda *a: None, **kw)  # "stopped" after one
    runs, learn = [], ev.learn
    monkeypatch.setattr(ev, "learn", lambda *a, **k: runs.append(1) or learn(*a, **k))
    said = []
    resumed = ev.evaluate(str(tiny_dir), tmp_path / "ev", scenes=2, log=said.append, **kw)
    assert any("resuming: 1 scene(s)" in s for s in said) and len(runs) == 1  # only the second scene ran
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["scene"] for r in saved["scenes"]] == [0, 1]
    assert saved["scenes"][0]["baseline"]["final_iou"] == first["table"]["baseline"]["mask_iou"]
    assert resumed["table"]["baseline"]["mask_iou"] == np.mean([r["baseline"]["final_iou"] for r in saved["scenes"]])
    key = json.loads((tmp_path / "ev" / ev.PARTIAL).read_text())["key"]
    said.clear()  # other weights or settings: nothing is reused
    assert ev._resume(tmp_path / "ev", {**key, "steps": 3}, 2, said.append) is None and "another evaluation" in said[0]
    assert ev._resume(tmp_path / "ev", key, 1, said.append) is None  # fewer scenes than done: afresh
    assert ev._resume(tmp_path / "ev", key, 3, said.append)["scenes"][1]["scene"] == 1
    assert "lr" not in key  # the default learning rate leaves the key as runs begun before --lr wrote it
    runs.clear()
    other = ev.evaluate(str(tiny_dir), tmp_path / "ev", scenes=1, log=said.append, **kw, lr=1e-3)
    assert len(runs) == 1 and other["settings"]["lr"] == 1e-3  # another learning rate: nothing reused
    assert ev._method_config("true_masks", 4, 0, 2, 0, lr=1e-3).lr == 1e-3
    assert ev._method_config("em_exclusive_fill", 4, 2, 2, 0, lr=2e-3).lr == 2e-3


def test_read_back_tells_each_concept_not_to_draw_its_neighbours(monkeypatch):
    from em_core.tiny_world import checker, evaluate

    asked = []

    def fake_generate(bundle, prompt, *, negative="", n=1, **kw):
        asked.append((prompt, negative))
        return [None] * n
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    monkeypatch.setattr(checker, "judge", lambda net, images: [("red", "star")] * len(images))
    info = {"[v1]": {"colour": "red", "shape": "star", "held_out": True},
            "[v2]": {"colour": "blue", "shape": "circle", "held_out": False},
            "[v3]": {"colour": "red", "shape": "square", "held_out": False}}
    state = type("S", (), {"concepts": None})()
    out = evaluate.read_back(None, None, state, info, n=2, steps=1, guidance=4.0, seed=0, negative="{others}")
    assert asked == [("a photo of [v1]", "[v2], [v3]"), ("a photo of [v2]", "[v1], [v3]"),
                     ("a photo of [v3]", "[v1], [v2]")]
    assert out == [(True, True, True)] * 2 + [(False, False, False)] * 2 + [(True, False, False)] * 2
    asked.clear()
    words = {"[v1]": "a red star", "[v2]": "a blue circle", "[v3]": "a red square"}
    evaluate.read_back(None, None, state, info, n=1, steps=1, guidance=4.0, seed=0, words=words)
    assert asked[0] == ("a photo of a red star", "")  # no negative unless asked
