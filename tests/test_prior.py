"""Prior preservation in the joint fine-tune (Break-A-Scene stage 2's class prior, issue 15 part 5)."""
import sys

import numpy as np
import pytest
import torch

from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.finetune import FinetuneConfig, finetune
from em_core.generate import generate
from em_core.prior import FOLDER, SEED, class_images
from em_core.training import on_backdrop

PRIOR = dict(prior_weight=1.0, class_prompt="a photo of grass", class_images=2, class_steps=2)


@pytest.fixture
def learned(bundle, scene_files):
    images = [prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")]
    cfg = LearnConfig(steps=2, refresh_every=0, mask_timesteps=4, mask_batch=4)
    return images, learn(bundle, images, start_state(bundle, images, cfg, {"[v1]": "red"}), progress=False)


def test_class_images_are_the_base_models_and_are_kept_and_read_back(bundle, tmp_path, monkeypatch):
    made = class_images(bundle, "a photo of grass", 2, tmp_path, steps=2, progress=False)
    files = sorted((tmp_path / FOLDER).glob("*.png"))
    assert [f.name for f in files] == ["class_0000.png", "class_0001.png"]
    ref = generate(bundle, "a photo of grass", seed=SEED + 1, steps=2, guidance=7.5, progress=False)[0]
    assert np.array_equal(np.asarray(made[1]), np.asarray(ref))
    # A second call reads them back instead of generating: a generator that fails proves it.
    def refuse(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(sys.modules["em_core.generate"], "generate", refuse)
    again = class_images(bundle, "a photo of grass", 2, tmp_path, steps=2, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(made, again))


def test_prior_loss_changes_the_training_and_is_logged(bundle, learned):
    images, state = learned
    kw = dict(steps=2, mode="lora", rank=2, lr=1e-2)
    plain = finetune(bundle, images, state, FinetuneConfig(**kw), progress=False)
    prior = finetune(bundle, images, state, FinetuneConfig(**kw, **PRIOR), progress=False)
    h = prior.history["finetune"]
    assert all(r["prior_loss"] > 0 for r in h) and "prior_loss" not in plain.history["finetune"][0]
    p0 = plain.history["finetune"][0]
    assert h[0]["loss"] == pytest.approx(p0["loss"] + h[0]["prior_loss"], rel=1e-5)  # same draws, prior added
    w1, w2 = plain.weights.tensors, prior.weights.tensors
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_a_resumed_prior_finetune_equals_an_unbroken_one(bundle, learned, tmp_path):
    images, state = learned
    kw = dict(steps=3, mode="lora", rank=2, lr=1e-2, **PRIOR)
    whole = finetune(bundle, images, state, FinetuneConfig(**kw), progress=False)
    calls = {"n": 0}

    def stop_after_one_step():
        calls["n"] += 1
        return calls["n"] > 2 + 1  # two class images made (one check each), then one step

    part = finetune(bundle, images, state, FinetuneConfig(**kw), out=tmp_path / "r", progress=False,
                    should_stop=stop_after_one_step)
    assert part.finetune["status"] == "cancelled" and part.finetune["step"] == 1
    resumed = finetune(bundle, images, part, FinetuneConfig(**kw), out=tmp_path / "r", progress=False)
    assert torch.equal(resumed.concepts.vectors, whole.concepts.vectors)
    assert all(torch.equal(whole.weights.tensors[k], resumed.weights.tensors[k]) for k in whole.weights.tensors)


def test_cancel_while_making_class_images_keeps_the_state_and_the_images(bundle, learned, tmp_path):
    images, state = learned
    calls = {"n": 0}

    def stop_after_one_image():
        calls["n"] += 1
        return calls["n"] > 1

    out = finetune(bundle, images, state, FinetuneConfig(steps=2, mode="lora", rank=2, **PRIOR), out=tmp_path,
                   progress=False, should_stop=stop_after_one_image)
    assert out.finetune["status"] == "cancelled" and out.finetune["step"] == 0
    assert "1 of 2" in out.finetune["message"] and out.weights is None
    assert len(list((tmp_path / FOLDER).glob("*.png"))) == 1


@pytest.mark.parametrize("bad, match", [(dict(prior_weight=-1.0), "prior_weight=-1.0"),
                                        (dict(prior_weight=1.0, class_images=0), "class_images=0"),
                                        (dict(prior_weight=1.0, class_steps=0), "class_steps=0")])
def test_bad_prior_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**bad)


def test_a_class_prompt_naming_a_concept_or_empty_is_refused(bundle, learned):
    images, state = learned
    for prompt, match in (("a photo of [v1]", "names a concept"), ("  ", "empty")):
        with pytest.raises(ValueError, match=f"class_prompt: .*{match}|class_prompt: {match}"):
            finetune(bundle, images, state, FinetuneConfig(steps=1, mode="lora", prior_weight=1.0,
                                                           class_prompt=prompt), progress=False)


def test_backdrops_paste_the_concepts_onto_class_images_and_keep_the_steps_draws(bundle, learned):
    images, state = learned
    z0, back = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    union = torch.zeros(1, 1, 4, 4)
    union[..., :2, :] = 1

    class Fixed:  # a class image whose every draw is `back`
        def sample_latent(self, flip, gen):
            return back.clone()

    pasted = on_backdrop(z0, union, [Fixed()], seed=0, step=3)
    assert torch.equal(pasted[..., :2, :], z0[..., :2, :]) and torch.equal(pasted[..., 2:, :], back[..., 2:, :])
    small = on_backdrop(torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 8, 8), [Fixed()], 0, 3)  # resized to fit
    assert small.shape == (1, 4, 8, 8) and torch.allclose(small, torch.ones(1, 4, 8, 8))
    cfg = dict(steps=2, mode="lora", rank=2, lr=1e-2, class_prompt="a photo of grass", class_images=2, class_steps=2)
    on = finetune(bundle, images, state, FinetuneConfig(backdrops=True, **cfg), progress=False)
    off = finetune(bundle, images, state, FinetuneConfig(**cfg), progress=False)
    draws = [[(h["image"], h["concepts"], h["t"], h["flip"]) for h in s.history["finetune"]] for s in (on, off)]
    assert draws[0] == draws[1]  # the same steps, only their latents pasted
    assert "prior_loss" not in on.history["finetune"][0]  # backdrops alone: no prior term
    assert on.history["finetune"][0]["mask_loss"] != off.history["finetune"][0]["mask_loss"]
