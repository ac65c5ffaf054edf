import json
import warnings

import numpy as np
import pytest
import torch

from em_core import em_loop, training
from em_core.config import LearnConfig
from em_core.dataset import check_prompts, prepare_image
from em_core.em_loop import learn, start_state
from em_core.masks import latent_masks
from em_core.state import load_state


def _images(bundle, scene_files, prompts=("a photo of [v1] and [v2] on [v3]", "[v1] and [v4] on grass")):
    return [prepare_image(bundle, p, prompt) for (p, _), prompt in zip(scene_files, prompts)]


def _cfg(**kw):
    base = dict(steps=6, refresh_every=3, mask_timesteps=4, refresh_timesteps=4, mask_batch=4, save_every=2, seed=1)
    base.update(kw)
    return LearnConfig(**base)


def test_learn_moves_only_the_concept_vectors(bundle, scene_files, tmp_path):
    images = _images(bundle, scene_files)
    state = start_state(bundle, images, _cfg(), {"[v1]": "red", "[v4]": "blue"})
    table = bundle.text_encoder.get_input_embeddings().weight.detach().clone()
    unet = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    text = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    before = state.copy()
    out = learn(bundle, images, state, out=tmp_path / "run", progress=False)
    assert out.status == "done" and out.step == 6
    # Every embedding row (old ones and the new concept rows) is bit-identical: the learned
    # vectors live in the state and are injected only while a concept set is in use.
    assert torch.equal(bundle.text_encoder.get_input_embeddings().weight, table)
    assert all(torch.equal(v, text[k]) for k, v in bundle.text_encoder.state_dict().items())
    assert all(torch.equal(v, unet[k]) for k, v in bundle.unet.state_dict().items())
    moved = (out.concepts.vectors - before.concepts.vectors).abs().amax(1)
    assert (moved > 0).all()  # all four concepts were sampled and moved
    assert torch.equal(state.concepts.vectors, before.concepts.vectors)  # the input state is untouched
    assert out.concepts.names == ["[v1]", "[v2]", "[v3]", "[v4]"]


def test_history_records_losses_masks_and_changes(bundle, scene_files, tmp_path):
    images = _images(bundle, scene_files)
    out = learn(bundle, images, start_state(bundle, images, _cfg(warmup_steps=2)), out=tmp_path / "r",
                progress=False)
    steps = out.history["steps"]
    assert [s["step"] for s in steps] == list(range(8))
    assert [s["phase"] for s in steps[:3]] == ["warmup", "warmup", "em"]
    assert all(np.isfinite(s["loss"]) for s in steps)
    em = [s for s in steps if s["phase"] == "em"]
    assert all(s["attn_loss"] > 0 for s in em) and all(s["concepts"] for s in em)
    assert all(s["attn_loss"] == 0 for s in steps[:2])
    refreshes = out.history["refreshes"]
    assert [(r["step"], r["kind"]) for r in refreshes] == [(2, "init"), (5, "refresh")]
    assert all(r["seconds"] > 0 for r in refreshes)  # what each E-step cost, for the speed benchmark
    change = refreshes[1]["change"]
    assert set(change) == {"img1", "img2"} and set(change["img2"]) == {"[v1]", "[v4]"}
    assert all(0.0 <= v <= 1.0 for per in change.values() for v in per.values())
    assert [h["step"] for h in out.mask_history] == [2, 5]
    assert out.mask_history[0]["masks"][0].shape == (3, 16, 16)  # latent grid
    saved = json.loads((tmp_path / "r" / "history.json").read_text())
    assert saved == out.history
    pngs = sorted(p.name for p in (tmp_path / "r" / "masks").glob("*.png"))
    assert pngs == ["img1_v1.png", "img1_v2.png", "img1_v3.png", "img2_v1.png", "img2_v4.png"]


def test_user_masks_stay_fixed_through_refreshes(bundle, scene_files):
    images = _images(bundle, scene_files)
    user = scene_files[0][1]["[v2]"]
    out = learn(bundle, images, start_state(bundle, images, _cfg(), fixed_masks={(0, "[v2]"): user}),
                progress=False)
    assert np.array_equal(out.concept_mask(0, "[v2]"), user)
    assert len(out.mask_history) == 2


def test_all_masks_given_is_break_a_scene(bundle, scene_files):
    images = _images(bundle, scene_files[:1])
    truth = scene_files[0][1]
    fixed = {(0, n): truth[n] for n in ["[v1]", "[v2]", "[v3]"]}
    out = learn(bundle, images, start_state(bundle, images, _cfg(), fixed_masks=fixed), progress=False)
    for n in truth:
        assert np.array_equal(out.concept_mask(0, n), truth[n])


def test_bad_inputs_are_named(bundle, scene_files):
    with pytest.raises(ValueError, match="names no concept"):
        check_prompts(["a.png"], ["a photo of a dog"])
    with pytest.raises(ValueError, match="one prompt per image"):
        check_prompts(["a.png", "b.png"], ["[v1]"])
    images = _images(bundle, scene_files)
    with pytest.raises(ValueError, match=r"\[v7\].*appear in no prompt"):
        start_state(bundle, images, _cfg(), {"[v7]": "dog"})
    with pytest.raises(ValueError, match=r"\[v4\] is given a mask on image 1"):
        start_state(bundle, images, _cfg(), fixed_masks={(0, "[v4]"): scene_files[0][1]["[v1]"]})
    with pytest.raises(ValueError, match="is empty"):
        start_state(bundle, images, _cfg(), fixed_masks={(0, "[v1]"): np.zeros((64, 64), bool)})
    with pytest.raises(ValueError, match="settings out of range: threshold"):
        LearnConfig(threshold=1.5)


def test_nan_loss_stops_and_keeps_the_last_good_state(bundle, scene_files, tmp_path, monkeypatch):
    images = _images(bundle, scene_files)
    real = training.masked_diffusion_loss
    calls = {"n": 0}

    def flaky(pred, target, union):
        calls["n"] += 1
        loss = real(pred, target, union)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(training, "masked_diffusion_loss", flaky)
    out = learn(bundle, images, start_state(bundle, images, _cfg()), out=tmp_path / "r", progress=False)
    assert out.status == "nan" and out.step == 3 and "not finite" in out.message
    assert torch.isfinite(out.concepts.vectors).all()
    saved = load_state(tmp_path / "r")
    assert saved.status == "nan" and saved.step == 3
    assert torch.equal(saved.concepts.vectors, out.concepts.vectors)


def test_cancel_keeps_what_was_learned(bundle, scene_files):
    images = _images(bundle, scene_files)
    seen = []
    out = learn(bundle, images, start_state(bundle, images, _cfg()), progress=False,
                should_stop=lambda: len(seen) >= 2, on_step=lambda s, info: seen.append(info["step"]))
    assert out.status == "cancelled" and out.step == 2


def test_ctrl_c_saves_the_last_good_step_and_resume_matches_an_unbroken_run(bundle, scene_files, tmp_path):
    images = _images(bundle, scene_files)
    cfg = _cfg(steps=13, refresh_every=6, save_every=100)  # refreshes at the top of steps 6 and 12
    unbroken = learn(bundle, images, start_state(bundle, images, cfg), progress=False)
    # Interrupt mid-interval, after a step that drew all of an image's concepts.
    full = [h["step"] for h in unbroken.history["steps"]
            if 6 <= h["step"] < 11 and len(h["concepts"]) == len(images[h["image"]].names)]
    assert full
    stop = full[0] + 1

    def interrupt(state, info):
        if state.step == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn(bundle, images, start_state(bundle, images, cfg), out=tmp_path / "r", on_step=interrupt,
              progress=False)
    saved = load_state(tmp_path / "r")
    assert saved.status == "interrupted" and saved.step == stop
    assert not list((tmp_path / "r").rglob("*.tmp"))  # atomic writes leave no temp files
    resumed = learn(bundle, images, saved, out=tmp_path / "r", progress=False)
    assert resumed.step == 13 and resumed.status == "done"
    assert [r["step"] for r in resumed.history["refreshes"]] == [0, 6, 12]
    assert all(np.array_equal(a, b) for a, b in zip(resumed.masks, unbroken.masks))
    assert torch.allclose(resumed.concepts.vectors, unbroken.concepts.vectors, atol=1e-6)
    assert [h["loss"] for h in resumed.history["steps"]] == pytest.approx(
        [h["loss"] for h in unbroken.history["steps"]], rel=1e-5)


def test_four_concepts_over_two_images_and_no_crf(bundle, scene_files):
    images = _images(bundle, scene_files, ("[v1] and [v2] on [v3]", "[v4] next to [v1]"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = _cfg(use_crf=False, mask_layers="all", loss_layers="all", flip=False)
        out = learn(bundle, images, start_state(bundle, images, cfg), progress=False)
    assert out.status == "done" and out.concepts.names == ["[v1]", "[v2]", "[v3]", "[v4]"]
    # Each image holds masks for its own concepts, at its size, and the last refresh recorded them.
    # (That every mask has pixels is no check: binarise refills an empty mask. Max-normalised maps
    # always pass the threshold somewhere, so the fallback is never needed unless the maps are NaN.)
    assert [im["names"] for im in out.images] == [["[v1]", "[v2]", "[v3]"], ["[v4]", "[v1]"]]
    assert [m.shape for m in out.masks] == [(3, 64, 64), (2, 64, 64)]
    assert not [str(w.message) for w in seen if "is empty at threshold" in str(w.message)]
    for i, im in enumerate(images):
        assert torch.equal(out.mask_history[-1]["masks"][i], latent_masks(out.masks[i], im.latent_hw))


def test_zero_steps_gives_the_attention_baseline(bundle, scene_files):
    images = _images(bundle, scene_files)
    out = learn(bundle, images, start_state(bundle, images, _cfg(steps=0)), progress=False)
    assert out.status == "done" and out.step == 0 and len(out.mask_history) == 1


def test_interrupt_during_a_mask_refresh_redoes_it_on_resume(bundle, scene_files, tmp_path, monkeypatch):
    images = _images(bundle, scene_files)
    cfg = _cfg(steps=6, refresh_every=3, save_every=1)
    unbroken = learn(bundle, images, start_state(bundle, images, cfg), progress=False)
    real = em_loop._Run.refresh_masks

    def once(self, kind):
        if kind == "refresh" and not getattr(once, "fired", False):
            once.fired = True
            raise KeyboardInterrupt
        return real(self, kind)

    monkeypatch.setattr(em_loop._Run, "refresh_masks", once)
    with pytest.raises(KeyboardInterrupt):
        learn(bundle, images, start_state(bundle, images, cfg), out=tmp_path / "r", progress=False)
    saved = load_state(tmp_path / "r")
    assert saved.step == 3 and [r["step"] for r in saved.history["refreshes"]] == [0]
    resumed = learn(bundle, images, saved, progress=False)
    assert [(r["step"], r["kind"]) for r in resumed.history["refreshes"]] == [(0, "init"), (3, "refresh")]
    assert torch.allclose(resumed.concepts.vectors, unbroken.concepts.vectors, atol=1e-6)


def test_tokens_start_from_their_init_word_and_the_shared_model_never_changes(bundle, scene_files):
    images = _images(bundle, scene_files)
    n_old = len(bundle.tokenizer)
    old_rows = bundle.text_encoder.get_input_embeddings().weight.detach().clone()
    state = start_state(bundle, images, _cfg(), {"[v1]": "red"})
    red = bundle.tokenizer("red", add_special_tokens=False).input_ids
    assert torch.allclose(state.concepts.vectors[0], old_rows[red].mean(0))
    out = learn(bundle, images, state, progress=False)
    assert len(bundle.tokenizer) == n_old
    assert torch.equal(bundle.text_encoder.get_input_embeddings().weight, old_rows)
    assert not torch.allclose(out.concepts.vectors[0], state.concepts.vectors[0])


def test_a_non_square_image_runs_end_to_end(bundle, tmp_path):
    from em_core.tiny_world.scenes import make_scene

    img = make_scene(seed=3).image.resize((120, 64))
    img.save(tmp_path / "wide.png")
    images = [prepare_image(bundle, tmp_path / "wide.png", "[v1] and [v2] on [v3]")]
    assert images[0].size == (88, 48)
    out = learn(bundle, images, start_state(bundle, images, _cfg(steps=4, refresh_every=2)), out=tmp_path / "r",
                progress=False)
    assert out.status == "done" and out.masks[0].shape == (3, 48, 88)
    assert out.mask_history[-1]["masks"][0].shape == (3, 12, 22)
    from PIL import Image

    assert Image.open(tmp_path / "r" / "masks" / "img1_v2.png").size == (120, 64)


def _count_unet_calls(bundle):
    calls = []
    handle = bundle.unet.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]),
                                                   with_kwargs=True)
    return calls, handle


def test_the_first_estimate_and_the_refreshes_take_their_own_timestep_counts(bundle, scene_files):
    images = _images(bundle, scene_files)
    calls, handle = _count_unet_calls(bundle)
    try:
        learn(bundle, images, start_state(bundle, images, _cfg(steps=4, refresh_timesteps=3, mask_batch=2)),
              progress=False)
    finally:
        handle.remove()
    # Per image: the first estimate's 4 timesteps in calls of 2; 3 token steps (batch 1); a refresh
    # of 3 timesteps (2 + 1) per image; the last token step.
    assert calls == [2, 2, 2, 2, 1, 1, 1, 2, 1, 2, 1, 1]


def test_a_run_saved_before_refresh_timesteps_existed_resumes_as_it_began():
    old = LearnConfig(mask_timesteps=40).to_dict()
    del old["refresh_timesteps"], old["timestep_sampling"]
    back = LearnConfig.from_dict(old)
    assert (back.refresh_timesteps, back.timestep_sampling) == (40, "uniform")
    assert LearnConfig().timestep_sampling == "stratified" and LearnConfig().refresh_timesteps == 30
    with pytest.raises(ValueError, match="timestep_sampling"):
        LearnConfig(timestep_sampling="sobol")


def test_a_run_with_a_removed_setting_is_refused_on_resume_and_its_config_still_reads(bundle, scene_files, tmp_path):
    """mask_source='training' and crf_overlap were removed (issue 18): a state saved with either
    set cannot go on as it began, so resuming it says so; configs that had them at their old
    defaults (every run saved before, as a rule) read as before."""
    import json

    from em_core.config import removed_settings

    images = _images(bundle, scene_files)
    learn(bundle, images, start_state(bundle, images, _cfg(steps=1)), out=tmp_path / "r", progress=False)
    old = {**LearnConfig().to_dict(), "mask_source": "fresh", "crf_overlap": 0}
    assert LearnConfig.from_dict(old) == LearnConfig() and removed_settings(old) == []
    assert removed_settings({**old, "mask_source": "training", "crf_overlap": 2}) == ["mask_source='training'",
                                                                                       "crf_overlap=2"]
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "r" / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["em_core"])
    meta["config"]["mask_source"] = "training"
    save_file(tensors, str(path), metadata={**header, "em_core": json.dumps(meta)})
    with pytest.raises(ValueError, match="mask_source='training'.*removed in issue 18"):
        load_state(tmp_path / "r")



def test_learn_more_counts_from_where_the_state_stands(bundle, scene_files):
    """The nodes' "steps" (this many more) through the engine's API, and `learn`'s config.steps (the
    run's end); the state records where the run began (run_from), which the CLI's resume reads."""
    from em_core.em_loop import continued, learn_more

    images = _images(bundle, scene_files)
    first = learn(bundle, images, start_state(bundle, images, _cfg(steps=2, refresh_every=0)), progress=False)
    assert first.step == 2
    more = learn_more(bundle, images, first, 3, lr=1e-3, refresh_every=0, progress=False)
    assert more.step == 5 and more.config.steps == 5 and more.config.lr == 1e-3 and first.config.lr != 1e-3
    assert more.status == "done" and more.run_from == 2 and first.run_from == 0
    with pytest.raises(ValueError, match="refresh_every"):
        continued(first, 3, refresh_every=-1)  # settings are checked as LearnConfig checks them
    with pytest.raises(TypeError):
        continued(first, 3, no_such_setting=1)


def test_refine_state_masks_keeps_user_masks_and_records_a_crf_step(bundle, scene_files):
    from em_core.crf import CRFParams
    from em_core.em_loop import refine_state_masks

    images = _images(bundle, scene_files)
    user = np.zeros(images[0].size[::-1], dtype=bool)
    user[4:20, 4:20] = True
    state = learn(bundle, images, start_state(bundle, images, _cfg(steps=0, use_crf=False),
                                              fixed_masks={(0, images[0].names[0]): user}), progress=False)
    out = refine_state_masks(state, images, CRFParams())
    assert np.array_equal(out.masks[0][0], user)
    assert out.history["refreshes"][-1] == {"step": state.step, "kind": "crf", "change": {}}
    assert len(out.mask_history) == len(state.mask_history) + 1
    assert len(state.history["refreshes"]) == len(out.history["refreshes"]) - 1  # the input is not changed
