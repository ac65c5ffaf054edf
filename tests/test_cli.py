import json

import numpy as np
import pytest
from PIL import Image

from em_core.cli import main
from em_core.state import load_state


def _learn_args(model, scene_files, out, steps=4, extra=()):
    (a, _), (b, _) = scene_files
    return ["learn", "--model", str(model), "--image", str(a), "--prompt", "a photo of [v1] and [v2] on [v3]",
            "--image", str(b), "--prompt", "[v1] on grass", "--init", "[v1]=red", "--steps", str(steps),
            "--refresh-every", "2", "--mask-timesteps", "4", "--out", str(out), "--quiet", *extra]


def test_learn_end_to_end_then_resume(tiny_dir, scene_files, tmp_path, capsys):
    out = tmp_path / "out"
    mask = scene_files[0][0].parent / "scene0_v2.png"
    assert main(_learn_args(tiny_dir, scene_files, out, extra=["--mask", f"[v2]={mask}"])) == 0
    state = load_state(out)
    assert state.step == 4 and state.status == "done"
    assert state.concepts.init_words == {"[v1]": "red", "[v2]": None, "[v3]": None}
    truth = np.asarray(Image.open(mask)) > 127
    assert np.array_equal(state.concept_mask(0, "[v2]"), truth)
    assert Image.open(out / "masks" / "img1_v2.png").size == (64, 64)
    meta = json.loads((out / "state.json").read_text())
    assert meta["step"] == 4 and meta["images"][1]["names"] == ["[v1]"]
    # On a finished run, --steps N runs N more (as an EM Token Step node's steps).
    assert main(_learn_args(tiny_dir, scene_files, out, steps=3)) == 0
    assert "continuing the finished run" in capsys.readouterr().out
    assert load_state(out).step == 7
    # Other images into the same folder are refused rather than mixed.
    (a, _), (b, _) = scene_files
    bad = ["learn", "--model", str(tiny_dir), "--image", str(b), "--prompt", "[v1]", "--steps", "1",
           "--out", str(out), "--quiet"]
    assert main(bad) == 2
    assert "holds a run on other images" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--mask", "[v1]=x.png"], "is in 2 images"),
    (["--mask", "[v9]=x.png"], "is in 0 images"),
    (["--init", "[v9]=dog"], "appear in no prompt"),
    (["--init", "v1-dog"], "not of the form"),
    (["--mask", "[v1]@x=m.png"], "write the image number after @"),
])
def test_learn_bad_arguments(tiny_dir, scene_files, tmp_path, capsys, extra, message):
    assert main(_learn_args(tiny_dir, scene_files, tmp_path / "o", extra=extra)) == 2
    assert message in capsys.readouterr().err


def test_learn_refuses_prompt_without_concepts_and_unreadable_images(tiny_dir, scene_files, tmp_path, capsys):
    a = str(scene_files[0][0])
    assert main(["learn", "--model", str(tiny_dir), "--image", a, "--prompt", "a photo", "--out",
                 str(tmp_path / "o")]) == 2
    assert "names no concept" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    assert main(["learn", "--model", str(tiny_dir), "--image", str(junk), "--prompt", "[v1]", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not a readable image" in capsys.readouterr().err
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(_learn_args(tiny_dir, scene_files, f)) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_runs_offline(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "4", "--quiet"]) == 0
    curve = json.loads((tmp_path / "d" / "iou_curve.json").read_text())
    assert curve and set(curve[0]["iou"]["img1"]) == {"[v1]", "[v2]", "[v3]"}
    assert (tmp_path / "d" / "iou_curve.png").is_file() and len(list((tmp_path / "d" / "generated").glob("*.png"))) == 6
    assert len(list((tmp_path / "d" / "run" / "masks").glob("*.png"))) == 3
    assert "mean mask IoU" in capsys.readouterr().out


def test_sigint_mid_run_leaves_the_last_good_state_on_disk(tiny_dir, scene_files, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = _learn_args(tiny_dir, scene_files, out, steps=100000, extra=["--save-every", "2"])
    env = dict(os.environ, PYTHONPATH=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    # A suite started in the background (`pytest &`) inherits SIGINT ignored, and so would the child,
    # which then never sees the signal: give it the default disposition, as a terminal's process has.
    proc = subprocess.Popen([sys.executable, "-m", "em_core", *args], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (out / "state.safetensors").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        # Signalled mid-run only: a signal during start-up lands in the libraries' imports instead.
        assert (out / "state.safetensors").exists(), f"no step was saved within 300 s (exit {proc.poll()})"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a 100,000-step run behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err
    state = load_state(out)
    assert state.status == "interrupted" and state.step >= 2
    assert len(state.history["steps"]) == state.step
    # Nothing was written beside OUT, and no temp file was left in it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not list(out.rglob("*.tmp"))


def test_learn_passes_the_mask_options_to_the_run(tiny_dir, scene_files, tmp_path, capsys):
    out = tmp_path / "opts"
    extra = ["--background", "[v3]", "--mask-t-range", "0", "600", "--mask-stickiness", "0.3", "--eval-every", "1",
             "--exclusive-masks", "--fill-lost", "--share-parts", "--no-shuffle", "--restart-moved", "0.5",
             "--step-prompt", "image"]
    assert main(_learn_args(tiny_dir, scene_files, out, steps=2, extra=extra)) == 0
    cfg = load_state(out).config
    assert (cfg.background, cfg.mask_t_range, cfg.mask_stickiness, cfg.eval_every) == ("[v3]", (0, 600), 0.3, 1)
    assert cfg.exclusive_masks and cfg.fill_lost and cfg.share_parts and not cfg.shuffle and cfg.restart_moved == 0.5
    assert cfg.step_prompt == "image"
    bad = _learn_args(tiny_dir, scene_files, tmp_path / "bad", steps=2, extra=["--mask-stickiness", "1.5"])
    assert main(bad) == 2
    assert "mask_stickiness" in capsys.readouterr().err


def test_steps_count_what_this_command_runs_as_a_nodes_steps_do(tiny_dir, scene_files, tmp_path, capsys):
    """`learn --steps N` on an OUT holding a finished run runs N more, as EM Token Step's steps add N
    to its input (until issue 18 it was the run's total, and the same command twice did nothing);
    a run stopped before its end is finished by the same command, counted from where it began."""
    from em_core.em_loop import continue_run, continued

    out = tmp_path / "out"
    assert main(_learn_args(tiny_dir, scene_files, out, steps=2)) == 0
    assert main(_learn_args(tiny_dir, scene_files, out, steps=2)) == 0  # the same command again: 2 more
    state = load_state(out)
    assert state.step == 4 and state.status == "done" and state.run_from == 2
    assert len(state.history["steps"]) == 4
    # The nodes' rule and the CLI's give the same end on a finished state.
    assert continue_run(state, 3).config.steps == continued(state, 3).config.steps == 7
    # An unfinished run (Ctrl-C, a crash, a non-finite loss) that began at 2 and asked for 3 is at 4:
    # the same --steps finishes it at 5; another number moves its end, counted from 2, not from 4.
    for status in ("interrupted", "running", "cancelled", "nan"):
        state.status, state.run_from = status, 2
        assert continue_run(state, 3).config.steps == 5 and continue_run(state, 3).run_from == 2
        assert continue_run(state, 6).config.steps == 8
        with pytest.raises(ValueError, match=r"--steps 1: the unfinished run here started at step 2 and has "
                                             r"reached step 4.*give --steps 2 or more"):
            continue_run(state, 1, "--steps")
    # And through the CLI, from the state file (run_from round-trips through it).
    state.status = "interrupted"
    from em_core.state import save_state

    save_state(state, out)
    capsys.readouterr()
    assert main(_learn_args(tiny_dir, scene_files, out, steps=3)) == 0
    assert "resuming the interrupted run" in capsys.readouterr().out
    again = load_state(out)
    assert again.step == 5 and again.status == "done" and again.run_from == 2
    assert main(_learn_args(tiny_dir, scene_files, out, steps=-1)) == 2


def test_finetune_steps_count_what_this_command_runs(tiny_dir, scene_files, tmp_path, capsys):
    """`finetune --steps N` as Joint Finetune's steps: N more on a finished fine-tune; an
    unfinished one is finished by the same command."""
    from em_core.finetune import finetune_steps

    run = tmp_path / "run"
    a = str(scene_files[0][0])
    assert main(["learn", "--model", str(tiny_dir), "--image", a, "--prompt", "a photo of [v1] and [v2] on [v3]",
                 "--steps", "1", "--refresh-every", "0", "--mask-timesteps", "2", "--out", str(run), "--quiet"]) == 0
    tune = ["finetune", "--state", str(run), "--steps", "1", "--mode", "lora", "--rank", "2", "--quiet"]
    assert main(tune) == 0 and main(tune) == 0  # the same command twice: 1, then 1 more
    state = load_state(run)
    assert state.finetune["step"] == 2 and state.finetune["status"] == "done" and state.finetune["run_from"] == 1
    assert len(state.history["finetune"]) == 2
    assert finetune_steps(state, 3) == (2, 5)
    state.finetune["status"] = "interrupted"
    assert finetune_steps(state, 1) == (1, 2) and finetune_steps(state, 4) == (1, 5)
    with pytest.raises(ValueError, match="steps 0: the unfinished run here started at step 1"):
        finetune_steps(state, 0)


def test_evaluate_passes_its_read_back_and_step_settings(monkeypatch, tmp_path):
    import em_core.tiny_world.evaluate as ev

    seen = {}

    def fake(model, out, **kw):
        seen.update(kw, model=model, out=out)
        return {"table": {}}

    monkeypatch.setattr(ev, "evaluate", fake)
    argv = ["evaluate", "--model", "M", "--out", str(tmp_path / "ev"), "--guidance", "7.5", "--lr", "4e-3",
            "--step-prompt", "image", "--methods", "true_masks"]
    assert main(argv) == 0
    assert (seen["guidance"], seen["lr"], seen["step_prompt"], seen["methods"]) == (7.5, 4e-3, "image", ("true_masks",))
    assert main(argv[:5]) == 0 and seen["guidance"] == 4.0  # the worlds' own sample guidance unless asked
