import pytest

from em_core import training
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.step_prompt import step_prompt

IMAGE = "a photo of [v1] and [v2] on [v3]"


def test_the_image_form_cuts_each_undrawn_concept_with_the_words_leading_to_it():
    assert step_prompt(IMAGE, ["[v1]", "[v3]"], "image") == "a photo of [v1] on [v3]"
    assert step_prompt(IMAGE, ["[v2]", "[v3]"], "image") == "a photo of [v2] on [v3]"
    assert step_prompt(IMAGE, ["[v1]", "[v2]"], "image") == "a photo of [v1] and [v2]"
    assert step_prompt(IMAGE, ["[v3]"], "image") == "a photo of [v3]"
    assert step_prompt(IMAGE, ["[v3]", "[v1]", "[v2]"], "image") == IMAGE
    # Words after the last concept belong to the whole scene and stay.
    assert step_prompt("[v1] next to [v2], at night", ["[v2]"], "image") == "[v2], at night"


def test_the_bas_form_names_the_drawn_concepts_in_their_order():
    assert step_prompt(IMAGE, ["[v3]", "[v1]"], "bas") == "a photo of [v3] and [v1]"


def test_bad_forms_and_concepts_are_named():
    with pytest.raises(ValueError, match="'poem'"):
        step_prompt(IMAGE, ["[v1]"], "poem")
    with pytest.raises(ValueError, match=r"\[v4\]"):
        step_prompt(IMAGE, ["[v4]"], "image")
    with pytest.raises(ValueError, match="step_prompt"):
        LearnConfig(step_prompt="poem")


@pytest.fixture
def step_prompts(monkeypatch):
    """The prompts the training steps encode, in order, from the moment the fixture is set up."""
    prompts = []
    real = training.encode_text

    def spy(b, texts):
        prompts.extend(texts)
        return real(b, texts)

    monkeypatch.setattr(training, "encode_text", spy)
    return prompts


@pytest.mark.parametrize("form", ["bas", "image"])
def test_each_token_step_prompts_in_the_configured_form(bundle, scene_files, step_prompts, form):
    prompts = step_prompts
    img = prepare_image(bundle, scene_files[0][0], IMAGE)
    cfg = LearnConfig(steps=6, refresh_every=0, mask_timesteps=2, mask_batch=2, step_prompt=form, save_every=10 ** 9)
    state = learn(bundle, [img], start_state(bundle, [img], cfg), progress=False)
    drawn = [s["concepts"] for s in state.history["steps"]]
    assert len(prompts) == 6
    for subset, prompt in zip(drawn, prompts):
        if form == "image":
            order = sorted(subset, key=img.names.index)
            assert subset == order and prompt == step_prompt(IMAGE, subset, "image")
        else:
            assert prompt == "a photo of " + " and ".join(subset)
    assert any("on [v3]" in p for p in prompts) == (form == "image" and any(
        len(s) > 1 and "[v3]" in s for s in drawn))


def test_the_joint_fine_tune_words_its_steps_as_the_learned_state(bundle, scene_files, request):
    from em_core.finetune import FinetuneConfig, finetune

    img = prepare_image(bundle, scene_files[0][0], IMAGE)
    cfg = LearnConfig(steps=1, refresh_every=0, mask_timesteps=2, mask_batch=2, step_prompt="image", save_every=10 ** 9)
    state = learn(bundle, [img], start_state(bundle, [img], cfg), progress=False)
    prompts = request.getfixturevalue("step_prompts")  # spying from here: the fine-tune's steps only
    out = finetune(bundle, [img], state, FinetuneConfig(steps=6, mode="lora", train_text_encoder=False), progress=False)
    drawn = [s["concepts"] for s in out.history["finetune"]]
    assert len(drawn) == 6 and len(prompts) == 6
    assert prompts == [step_prompt(IMAGE, sorted(s, key=img.names.index), "image") for s in drawn]
