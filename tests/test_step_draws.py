"""What a training step draws, as Break-A-Scene draws it: a random subset of the image's concepts
in random order (BaS's `random.sample`), from the step's own seeded generator."""
import random

import torch

from em_core import training
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.training import step_rng


def _run(bundle, images, seed, prompts):
    cfg = LearnConfig(steps=8, refresh_every=0, mask_timesteps=2, mask_batch=2, seed=seed, use_crf=False)
    out = learn(bundle, images, start_state(bundle, images, cfg), progress=False)
    return out.history["steps"]


def _spied(bundle, scene_files, monkeypatch):
    """The scene's image, its names and the list every step's prompt is appended to."""
    images = [prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")]
    prompts = []
    encode = training.encode_text
    monkeypatch.setattr(training, "encode_text", lambda b, p: (prompts.append(p[0]), encode(b, p))[1])
    return images, images[0].names, prompts


def test_the_concept_order_is_shuffled_per_step_from_the_steps_seeded_generator(bundle, scene_files, monkeypatch):
    images, names, prompts = _spied(bundle, scene_files, monkeypatch)
    random.seed(1)
    torch.manual_seed(1)
    first = _run(bundle, images, 3, prompts)
    random.seed(2)  # the global generators play no part
    torch.manual_seed(2)
    again = _run(bundle, images, 3, prompts)
    orders = [h["concepts"] for h in first]
    assert orders == [h["concepts"] for h in again]
    assert prompts[:8] == prompts[8:16] == ["a photo of " + " and ".join(o) for o in orders]
    # Each step's order is the one its (seed, step) generator draws, whatever came before.
    for h in first:
        rnd = step_rng(3, h["step"])[1]
        rnd.randrange(len(images))
        assert h["concepts"] == rnd.sample(names, rnd.randint(1, len(names)))
    # Not the image's order every time: over 8 steps some multi-concept prompt comes shuffled.
    assert any(len(o) > 1 and o != sorted(o, key=names.index) for o in orders)
    assert [h["concepts"] for h in _run(bundle, images, 4, prompts)] != orders


def test_without_shuffle_the_same_concepts_are_drawn_in_the_image_prompts_order(bundle, scene_files, monkeypatch):
    images, names, prompts = _spied(bundle, scene_files, monkeypatch)
    shuffled = _run(bundle, images, 3, prompts)
    cfg = LearnConfig(steps=8, refresh_every=0, mask_timesteps=2, mask_batch=2, seed=3, use_crf=False, shuffle=False)
    ordered = learn(bundle, images, start_state(bundle, images, cfg), progress=False).history["steps"]
    assert [sorted(h["concepts"]) for h in ordered] == [sorted(h["concepts"]) for h in shuffled]
    assert all(h["concepts"] == sorted(h["concepts"], key=names.index) for h in ordered)
    assert prompts[8:] == ["a photo of " + " and ".join(h["concepts"]) for h in ordered]
