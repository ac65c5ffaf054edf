"""The world model's binding supervision: which caption words attend to which object, and a
loss that prefers maps binding each word to its own object over maps that mark the other one."""
import torch

from em_core.tiny_world.scenes import SceneObject, render
from em_core.tiny_world.world_train import BindingStore, word_targets


def _scene():
    objs = [SceneObject("red", "circle", "striped"), SceneObject("blue", "square")]
    return render(objs, "grass", 64, seed=0, boxes=[(2, 2, 26, 26), (36, 36, 62, 62)])


def test_each_object_word_and_the_background_word_get_their_own_mask():
    s = _scene()
    assert s.caption == "a red striped circle and a blue square on grass"
    sel, masks, present = word_targets([s, s], [True, False], 32, (16, 16))
    # bos a red striped circle and a blue square on grass: words at 2, 3, 4 | 7, 8 | 10
    assert [int(sel[0, :, t].argmax()) for t in range(int(present[0].sum()))] == [2, 3, 4, 7, 8, 10]
    assert not present[1].any()  # a dropped caption supervises nothing
    circle, square = (torch.from_numpy(s.masks[k].astype("float32")) for k in list(s.masks)[:2])
    pooled = torch.nn.functional.avg_pool2d
    assert torch.allclose(masks[0, 0], pooled(circle[None, None], 4)[0, 0])
    assert torch.allclose(masks[0, 3], pooled(square[None, None], 4)[0, 0])
    assert torch.equal(masks[0, 1], masks[0, 0]) and torch.equal(masks[0, 4], masks[0, 3])  # one mask per object
    assert torch.allclose(masks[0, 0] + masks[0, 3] + masks[0, 5], torch.ones(16, 16))  # objects + grass cover all


def _loss(s, swap: bool) -> float:
    sel, masks, present = word_targets([s], [True], 32, (16, 16))
    own = masks[0, : int(present[0].sum())]
    if swap:  # the first object's words look at the second object and the other way round
        own = own[[3, 3, 3, 0, 0, 5]]
    # probs (B=1, heads=1, N=256, L=32): each supervised word's column is its map, the rest uniform.
    probs = torch.full((1, 1, 256, 32), 1e-3)
    for t in range(own.shape[0]):
        probs[0, 0, :, int(sel[0, :, t].argmax())] = own[t].flatten() + 1e-3
    probs = probs / probs.sum(-1, keepdim=True)
    store = BindingStore({"layer": 1}, (16, 16), sel, masks, present)
    store.add("layer", probs)
    return float(store.loss())


def test_the_binding_loss_prefers_words_on_their_own_objects():
    s = _scene()
    right, swapped = _loss(s, False), _loss(s, True)
    assert right < 0.2 < swapped


def test_photo_forms_shift_the_supervised_positions_and_may_drop_the_background():
    from em_core.tiny_world.world_train import caption_forms, caption_in_form

    s = _scene()
    assert caption_in_form(s, "scene") == s.caption
    assert caption_in_form(s, "photo") == "a photo of " + s.caption
    assert caption_in_form(s, "photo_no_background") == "a photo of a red striped circle and a blue square"
    sel, masks, present = word_targets([s, s], [True, True], 32, (16, 16), ["photo", "photo_no_background"])
    # bos a photo of a red striped circle and a blue square on grass: 5, 6, 7 | 10, 11 | 13
    assert [int(sel[0, :, t].argmax()) for t in range(int(present[0].sum()))] == [5, 6, 7, 10, 11, 13]
    assert [int(sel[1, :, t].argmax()) for t in range(int(present[1].sum()))] == [5, 6, 7, 10, 11]
    assert torch.equal(masks[0, :5], masks[1, :5])
    forms = caption_forms(7, 400, 0.5)
    assert forms == caption_forms(7, 400, 0.5) and set(forms) == {"scene", "photo", "photo_no_background"}
    assert 0.4 < forms.count("scene") / 400 < 0.6
    assert set(caption_forms(7, 50, 0.0)) == {"scene"}


def test_the_card_names_caption_forms_and_the_tokenizer_fix_only_for_runs_that_had_them(tmp_path):
    from em_core.tiny_world.world_train import _card_extras

    old = [{"command": "c1", "attn_weight": 0.5}]
    assert "Caption forms" not in _card_extras(old, tmp_path) and "Tokenizer" not in _card_extras(old, tmp_path)
    new = old + [{"command": "c2", "attn_weight": 0.5, "photo_share": 0.5, "whole_words": True}]
    card = _card_extras(new, tmp_path)
    assert "`--photo-share` (0.5)" in card and '"green" in four' in card
    assert "VAE on every shape" not in card
    assert "VAE on every shape" in _card_extras(new + [{"command": "c3", "vae_all_shapes": True}], tmp_path)


def test_unnamed_objects_are_drawn_but_neither_captioned_nor_supervised():
    import numpy as np

    from em_core.tiny_world.scenes import HELD_OUT_SHAPES, unnamed
    from em_core.tiny_world.world_train import scene_batch

    objs = [SceneObject("red", "circle"), SceneObject("blue", "star")]
    s = render(objs, "grass", 64, seed=0, boxes=[(2, 2, 26, 26), (36, 36, 62, 62)])
    u = unnamed(s)
    assert u.caption == "a red circle on grass" and [o.shape for o in u.objects] == ["circle"]
    assert list(u.masks) == ["a red circle", "grass"] and u.image is s.image
    star = s.masks["a blue star"]
    assert star.any() and not (u.masks["grass"] & star).any()  # the star's pixels are nobody's
    sel, masks, present = word_targets([u], [True], 32, (16, 16))
    assert int(present[0].sum()) == 3  # red, circle, grass
    assert unnamed(_scene()) is not None and unnamed(_scene()).caption == _scene().caption
    x, captions, scenes, _ = scene_batch(11, 48, with_scenes=True, unnamed_share=1.0)
    assert not any(w in c for c in captions for w in HELD_OUT_SHAPES)
    drawn = [sc for sc in scenes if (~np.any(np.stack(list(sc.masks.values())), axis=0)).any()]
    assert drawn and all(sc.objects for sc in scenes)  # some scenes hold an unnamed object; every one names one
    from em_core.tiny_world.scenes import TRAIN_SHAPES, random_scene
    from em_core.tiny_world.world_train import WORLD

    _, plain = scene_batch(11, 48)  # off: the scenes of before
    assert plain == [random_scene(11 + i, size=WORLD["size"], shapes=TRAIN_SHAPES).caption for i in range(48)]


def test_unnamed_objects_may_keep_their_colour_in_the_caption():
    import numpy as np

    from em_core.tiny_world.scenes import HELD_OUT_SHAPES, unnamed
    from em_core.tiny_world.world_train import scene_batch

    objs = [SceneObject("red", "circle"), SceneObject("blue", "star", "striped")]
    s = render(objs, "grass", 64, seed=0, boxes=[(2, 2, 26, 26), (36, 36, 62, 62)])
    u = unnamed(s, colour=True)
    assert u.caption == "a red circle and a blue striped on grass"
    assert list(u.masks) == list(s.masks) and [o.shape for o in u.objects] == ["circle", "star"]
    # The binding loss ties "blue" and "striped" (words 5 and 6, positions 6 and 7) to the star's pixels.
    sel, masks, present = word_targets([u], [True], 32, (16, 16))
    assert int(present[0].sum()) == 5  # red, circle, blue, striped, grass
    star = torch.from_numpy(s.masks["a blue striped star"].astype(np.float32))[None, None]
    star = torch.nn.functional.interpolate(star, size=(16, 16), mode="area")[0, 0]
    for pos in (6, 7):
        t = int(sel[0, pos].argmax())
        assert sel[0, pos, t] == 1 and torch.allclose(masks[0, t], star)
    assert sel[0, 8].sum() == 0 and sel[0, 9].sum() == 1  # "on" at 8 supervises nothing, "grass" at 9 does
    _, captions, scenes, _ = scene_batch(11, 48, with_scenes=True, unnamed_share=1.0, unnamed_colour=True)
    assert not any(w in c for c in captions for w in HELD_OUT_SHAPES)
    held = [o for sc in scenes for o in sc.objects if o.shape in HELD_OUT_SHAPES]
    assert held and all(not o.shape_named for o in held)
    assert all(any(o.shape_named for o in sc.objects) for sc in scenes)  # every caption names a shape


def test_unnamed_objects_may_share_one_word_bound_to_them(tmp_path):
    import numpy as np
    import pytest

    from em_core.tiny_world.scenes import HELD_OUT_SHAPES, unnamed
    from em_core.tiny_world.world_train import scene_batch, train_tiny_world

    objs = [SceneObject("red", "circle"), SceneObject("blue", "star", "striped")]
    s = render(objs, "grass", 64, seed=0, boxes=[(2, 2, 26, 26), (36, 36, 62, 62)])
    u = unnamed(s, word="the")
    assert u.caption == "a red circle and a blue striped the on grass"
    assert list(u.masks) == list(s.masks) and [o.shape for o in u.objects] == ["circle", "star"]
    # "blue", "striped" and "the" (positions 6, 7, 8) are bound to the star's pixels, "grass" (10) to the ground.
    sel, masks, present = word_targets([u], [True], 32, (16, 16))
    assert int(present[0].sum()) == 6
    star = torch.from_numpy(s.masks["a blue striped star"].astype(np.float32))[None, None]
    star = torch.nn.functional.interpolate(star, size=(16, 16), mode="area")[0, 0]
    for pos in (6, 7, 8):
        t = int(sel[0, pos].argmax())
        assert sel[0, pos, t] == 1 and torch.allclose(masks[0, t], star)
    assert sel[0, 9].sum() == 0 and sel[0, 10].sum() == 1
    _, captions, scenes, _ = scene_batch(11, 48, with_scenes=True, unnamed_share=1.0, unnamed_word="the")
    assert not any(w in c.split() for c in captions for w in HELD_OUT_SHAPES)
    held = [o for sc in scenes for o in sc.objects if o.shape in HELD_OUT_SHAPES]
    assert held and all(o.noun == "the" for o in held) and any(" the" in c for c in captions)
    with pytest.raises(ValueError, match="unnamed_word: 'star'"):
        train_tiny_world(tmp_path / "w", minutes=0.0, unnamed_share=0.5, unnamed_word="star")
    with pytest.raises(ValueError, match="unnamed_colour and unnamed_word"):
        train_tiny_world(tmp_path / "w", minutes=0.0, unnamed_share=0.5, unnamed_word="the", unnamed_colour=True)


def test_the_vae_may_see_every_shape_and_by_default_sees_only_the_named_ones():
    from em_core.tiny_world.scenes import HELD_OUT_SHAPES
    from em_core.tiny_world.world_train import scene_batch, vae_pixels, vae_scenes

    def shapes(scenes):
        return {o.shape for s in scenes for o in s.objects}

    assert not shapes(vae_scenes(5, 64)) & set(HELD_OUT_SHAPES)
    assert set(HELD_OUT_SHAPES) <= shapes(vae_scenes(5, 64, all_shapes=True))
    assert torch.equal(vae_pixels(5, 4), scene_batch(5, 4)[0])  # the default draws what it always drew
