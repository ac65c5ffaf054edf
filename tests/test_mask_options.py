"""Mask estimation apart from the loss: layer choice per purpose, a background concept taken as
what no object claims, a timestep range, and the held-out fixed-noise loss."""
import numpy as np
import pytest
import torch

from em_core import em_loop
from em_core.attention import select_layers
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.masks import draw_timesteps, masks_from_maps


def _cfg(**kw):
    base = dict(steps=4, refresh_every=2, mask_timesteps=4, refresh_timesteps=4, mask_batch=4, save_every=100,
                seed=1, use_crf=False)
    base.update(kw)
    return LearnConfig(**base)


def test_masks_read_every_layer_and_the_loss_reads_break_a_scenes_by_default(bundle, scene_files, monkeypatch):
    d = LearnConfig()
    assert (d.mask_layers, d.loss_layers) == ("all", "coarse")
    # A run saved with the single setting of before goes on with it for both purposes.
    legacy = {k: v for k, v in d.to_dict().items() if k not in ("mask_layers", "loss_layers")}
    old = LearnConfig.from_dict({**legacy, "layers": "coarse"})
    assert (old.mask_layers, old.loss_layers) == ("coarse", "coarse")
    seen = []
    real = em_loop.AttentionCapture

    class Spy(real):
        def __init__(self, unet, mode="coarse", stop_early=False):
            seen.append(("loss", mode))
            super().__init__(unet, mode, stop_early)

    import em_core.masks as masks_mod
    real_maps = masks_mod.AttentionCapture

    class MapSpy(real_maps):
        def __init__(self, unet, mode="coarse", stop_early=False):
            seen.append(("mask", mode, sorted(select_layers(unet, mode))))
            super().__init__(unet, mode, stop_early)

    monkeypatch.setattr(em_loop, "AttentionCapture", Spy)
    monkeypatch.setattr(masks_mod, "AttentionCapture", MapSpy)
    images = [prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")]
    learn(bundle, images, start_state(bundle, images, _cfg(steps=1)), progress=False)
    assert ("loss", "coarse") in seen
    mask_calls = [s for s in seen if s[0] == "mask"]
    assert mask_calls and all(c[1] == "all" for c in mask_calls)
    assert len(mask_calls[0][2]) > len(select_layers(bundle.unet, "coarse"))


def test_a_background_concept_is_what_no_object_claims(bundle, scene_files):
    img = prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")
    h, w = img.size[1] // 8, img.size[0] // 8
    maps = torch.zeros(3, h, w)
    maps[0, :4, :4] = 1.0   # [v1] top left
    maps[1, -4:, -4:] = 1.0  # [v2] bottom right
    maps[2, :4, :4] = 1.0   # [v3]'s own map peaks on the first object, as background words do
    own = masks_from_maps(img, maps, use_crf=False)
    assert (own[2] & own[0]).any()
    bg = masks_from_maps(img, maps, use_crf=False, background="[v3]")
    assert np.array_equal(bg[2], ~(bg[0] | bg[1]))
    assert not (bg[2] & bg[0]).any() and bg[2].any()
    with pytest.raises(ValueError, match="appears in no prompt"):
        start_state(bundle, [img], _cfg(background="[v7]"))


def test_mask_timesteps_stay_in_their_range():
    gen = torch.Generator().manual_seed(0)
    t = draw_timesteps(30, 1000, gen, True, (100, 700))
    assert int(t.min()) >= 100 and int(t.max()) < 700
    assert len(set((t - 100).div(20, rounding_mode="floor").tolist())) == 30  # one per slice
    t = draw_timesteps(30, 1000, gen, False, (100, 700))
    assert int(t.min()) >= 100 and int(t.max()) < 700
    with pytest.raises(ValueError, match="empty"):
        draw_timesteps(3, 1000, gen, True, (700, 700))
    with pytest.raises(ValueError, match="mask_t_range"):
        LearnConfig(mask_t_range=(500, 100))


def test_the_fixed_noise_loss_is_logged_and_only_learning_moves_it(bundle, scene_files):
    images = [prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")]
    state = start_state(bundle, images, _cfg(steps=4, eval_every=2, lr=5e-2))
    out = learn(bundle, images, state, progress=False)
    ev = out.history["eval"]
    assert [e["step"] for e in ev] == [0, 2, 4]
    assert len({e["loss"] for e in ev}) == 3  # the vectors moved, so the fixed-noise loss did
    # With nothing learned (lr tiny) the points agree: the same noise and timesteps each time.
    still = learn(bundle, images, start_state(bundle, images, _cfg(steps=2, eval_every=1, lr=1e-12)),
                  progress=False)
    assert still.history["eval"][0]["loss"] == pytest.approx(still.history["eval"][-1]["loss"], rel=1e-6)


def test_stickiness_is_a_hysteresis_on_the_previous_masks():
    from em_core.masks import binarise

    # One concept, four pixels; normalised map values 0, 0.35, 0.65, 1.
    maps = torch.tensor([[[0.0, 0.35], [0.65, 1.0]]])
    prev = np.array([[[False, True], [False, False]]])
    plain = binarise(maps, (2, 2), 0.5, ["[v1]"])
    assert plain.tolist() == [[[False, False], [True, True]]]
    # s = 0.3: a pixel already in the mask stays above (0.5 - 0.3) / 0.7 = 0.29, a new one joins
    # only above 0.5 / 0.7 = 0.71.
    sticky = binarise(maps, (2, 2), 0.5, ["[v1]"], prev, 0.3)
    assert sticky.tolist() == [[[False, True], [False, True]]]
    assert np.array_equal(binarise(maps, (2, 2), 0.5, ["[v1]"], prev, 0.0), plain)
    with pytest.raises(ValueError, match="previous masks"):
        binarise(maps, (2, 2), 0.5, ["[v1]"], np.zeros((1, 3, 3), bool), 0.3)
    with pytest.raises(ValueError, match="mask_stickiness"):
        LearnConfig(mask_stickiness=1.0)


def test_refreshes_pass_the_masks_before_them_and_the_first_estimate_none(bundle, scene_files, monkeypatch):
    seen = []
    real = em_loop.estimate_masks

    def spy(*a, **kw):
        seen.append((kw.get("previous") is not None, kw.get("stickiness")))
        return real(*a, **kw)

    monkeypatch.setattr(em_loop, "estimate_masks", spy)
    img = prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")
    cfg = _cfg(mask_stickiness=0.3)
    learn(bundle, [img], start_state(bundle, [img], cfg), progress=False)
    assert seen == [(False, 0.3), (True, 0.3)]


def test_exclusive_masks_give_a_shared_object_to_the_higher_map_and_send_the_other_to_its_next_peak():
    from em_core.masks import binarise

    # Two concepts on a 1 x 4 strip (maps already in [0, 1], so normalising keeps them): both cover
    # pixels 0-1 (one object); the second also has a lesser bump on pixel 3 (the other object), as two
    # tokens started from one word have.
    maps = torch.tensor([[[1.0, 0.6, 0.0, 0.0]], [[0.9, 1.0, 0.0, 0.3]]])
    plain = binarise(maps, (4, 1), 0.5, ["[v1]", "[v2]"])
    assert plain.tolist() == [[[True, True, False, False]], [[True, True, False, False]]]  # both on one object
    excl = binarise(maps, (4, 1), 0.5, ["[v1]", "[v2]"], exclusive=True)
    # Pixel 0 to [v1] (1.0 > 0.9), pixel 1 to [v2] (1.0 > 0.6): [v2] kept half its mask, so it stays.
    assert excl.tolist() == [[[True, False, False, False]], [[False, True, False, False]]]
    # When the second loses all it had (pixel 0 a tie, which goes to the first; pixel 1 0.9 > 0.8),
    # it looks again where the first is not, renormalised there: its bump on pixel 3.
    maps = torch.tensor([[[1.0, 0.9, 0.0, 0.0]], [[1.0, 0.8, 0.0, 0.6]]])
    excl = binarise(maps, (4, 1), 0.5, ["[v1]", "[v2]"], exclusive=True)
    assert excl.tolist() == [[[True, True, False, False]], [[False, False, False, True]]]
    assert not (excl[0] & excl[1]).any()
    # Ownership goes by the raw maps, which compare across concepts: both peak on pixel 0 (1.0 each
    # once normalised), but the pixel attends to the second three times as much; the first, a weak
    # token, then looks where the second is not (pixel 3).
    maps = torch.tensor([[[0.2, 0.0, 0.0, 0.1]], [[0.6, 0.0, 0.0, 0.0]]])
    excl = binarise(maps, (4, 1), 0.5, ["[v1]", "[v2]"], exclusive=True)
    assert excl.tolist() == [[[False, False, False, True]], [[True, False, False, False]]]


def test_exclusive_masks_reach_the_estimate_from_the_config(bundle, scene_files, monkeypatch):
    seen = []
    real = em_loop.estimate_masks

    def spy(*a, **kw):
        seen.append(kw.get("exclusive"))
        return real(*a, **kw)

    monkeypatch.setattr(em_loop, "estimate_masks", spy)
    img = prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")
    learn(bundle, [img], start_state(bundle, [img], _cfg(exclusive_masks=True)), progress=False)
    assert seen == [True, True]


def test_components_label_each_four_connected_part():
    from em_core.unclaimed import components

    region = np.array([[1, 1, 0, 0, 1],
                       [0, 1, 0, 1, 1],
                       [1, 0, 0, 0, 0],
                       [1, 1, 0, 1, 0]], dtype=bool)
    lab = components(region)
    assert lab[~region].tolist() == [0] * int((~region).sum())
    # Four parts; the diagonal touch of (1, 1) and (2, 0) does not join them.
    parts = {int(v) for v in lab[region]}
    assert parts == {1, 2, 3, 4}
    assert lab[0, 0] == lab[0, 1] == lab[1, 1]
    assert lab[0, 4] == lab[1, 3] == lab[1, 4]
    assert lab[2, 0] == lab[3, 0] == lab[3, 1] != lab[1, 1]
    assert lab[3, 3] not in (lab[0, 0], lab[0, 4], lab[2, 0])


def test_components_match_scipy_and_join_a_serpentine():
    from scipy import ndimage

    from em_core.unclaimed import components

    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        region = rng.random((40, 50)) < density
        ours, (theirs, n) = components(region), ndimage.label(region)  # 4-connected by default
        assert ours.max() == n
        pairs = set(zip(ours[region].tolist(), theirs[region].tolist()))
        assert len(pairs) == n  # the same partition, whatever the numbering
    snake = np.zeros((64, 64), dtype=bool)
    snake[::4] = True
    for i in range(0, 60, 8):
        snake[i:i + 5, -1] = True
        snake[i + 4:i + 9, 0] = True
    assert components(snake).max() == 1


def test_a_lost_concept_takes_the_unclaimed_region_its_map_covers_most():
    from em_core.unclaimed import give_unclaimed

    # 10 x 10: [v1] holds the left object, [v2] came out with one pixel (lost: under 1% would be
    # < 1 pixel, so ask for 5%), [v3] the background; two regions nobody claims: the right (rows
    # 0-3, cols 7-9) and the bottom (rows 8-9, cols 3-6). [v2]'s map is higher on the bottom one.
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, 0:5, 0:5] = True
    masks[1, 5, 5] = True
    masks[2] = True
    masks[2, 0:5, 0:5] = masks[2, 5, 5] = False
    masks[2, 0:4, 7:10] = masks[2, 8:10, 3:7] = False
    attention = np.zeros((3, 10, 10), dtype=np.float32)
    attention[1, 0:4, 7:10] = 0.2
    attention[1, 8:10, 3:7] = 0.5
    out, took = give_unclaimed(masks, attention, [0, 1, 2], min_area=0.05)
    assert took == [1]
    assert out[1].sum() == 8 and out[1, 8:10, 3:7].all()
    assert (out[0] == masks[0]).all() and (out[2] == masks[2]).all()
    # Two lost concepts share the regions, the more attended choosing first; no region is
    # given twice, and a concept with a real mask is left as it is.
    masks[0] = False
    masks[0, 5, 6] = True
    attention[0, 8:10, 3:7] = 0.9
    out, took = give_unclaimed(masks, attention, [0, 1, 2], min_area=0.05)
    assert took == [0, 1]
    assert out[0, 8:10, 3:7].all() and out[1, 0:4, 7:10].all() and not (out[0] & out[1]).any()
    # Free parts under min_area are no region (the largest now is [v1]'s old 25 pixels): nothing to give.
    out, took = give_unclaimed(masks, attention, [0, 1, 2], min_area=0.3)
    assert took == [] and (out == masks).all()


def test_fill_lost_reaches_the_estimate_and_gives_a_lost_concept_the_free_object(bundle, scene_files, monkeypatch):
    import em_core.masks as masks_mod

    img = prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")
    h, w = img.size[1] // 8, img.size[0] // 8
    maps = torch.zeros(3, h, w)
    maps[0, : h // 2, : w // 2] = 1.0  # [v1] top left
    maps[1, : h // 2, : w // 2] = 0.5  # [v2] peaks on [v1]'s object too
    maps[2, :, :] = 1.0
    maps[2, : h // 2, : w // 2] = 0.0
    maps[2, -h // 4:, -w // 4:] = 0.0  # the object [v2] stands for: nobody's

    def crf_keeps_one_pixel_of_v2(image, masks, params, fixed):  # as DenseCRF does to a mask on another's object
        out = masks.copy()
        out[1] = False
        out[1, 0, 0] = True
        out[0, 0, 0] = False
        return out

    monkeypatch.setattr(masks_mod, "refine_keeping", crf_keeps_one_pixel_of_v2)
    plain = masks_from_maps(img, maps, exclusive=True)
    corner = np.zeros_like(plain[1])
    corner[-img.size[1] // 4:, -img.size[0] // 4:] = True
    free = ~plain.any(0)
    assert plain[1].sum() == 1 and (free & corner).sum() >= 0.8 * corner.sum()
    filled = masks_from_maps(img, maps, exclusive=True, fill_lost=True)
    assert (filled[1] & corner).sum() >= 0.8 * corner.sum() and not (filled[1] & ~free).any()
    assert (filled[[0, 2]] == plain[[0, 2]]).all()
    monkeypatch.undo()
    assert _estimate_settings(bundle, img, monkeypatch, "fill_lost", fill_lost=True) == [True, True]


def test_a_concept_still_lost_takes_the_part_of_a_mask_where_its_share_is_highest():
    from em_core.unclaimed import give_parts

    # 10 x 10: [v2]'s mask covers two touching objects (rows 0-4, cols 0-9), [v1] came out empty,
    # [v3] is the rest. [v1]'s map is high on both objects but, against [v2]'s, highest on the right one.
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[1, 0:5, :] = True
    masks[2, 5:, :] = True
    attention = np.full((3, 10, 10), 0.1, dtype=np.float32)
    attention[0, 0:5, :] = 0.4
    attention[1, 0:5, 0:5] = 0.8  # [v2]'s own object: the left one
    attention[1, 0:5, 5:] = 0.4
    out, took = give_parts(masks, attention, [0, 1, 2], min_area=0.05)
    assert took == [0]
    assert out[0, 0:5, 5:].all() and out[0].sum() == 25
    assert out[1, 0:5, 0:5].all() and out[1].sum() == 25 and (out[2] == masks[2]).all()
    # A mask that would be left under min_area gives nothing; nor does any mask when nobody is lost.
    out, took = give_parts(masks, attention, [0, 1, 2], min_area=0.3)
    assert took == [] and (out == masks).all()
    masks[0, 9, 9] = masks[0, 8, 9] = masks[0, 9, 8] = masks[0, 8, 8] = masks[0, 7, 9] = True
    masks[2] &= ~masks[0]
    out, took = give_parts(masks, attention, [0, 1, 2], min_area=0.05)
    assert took == [] and (out == masks).all()
    # Only the concepts in rows give or take (a user's mask is neither).
    masks[0] = False
    out, took = give_parts(masks, attention, [0, 2], min_area=0.05)
    assert (out[1] == masks[1]).all()


def test_share_parts_reaches_the_estimate_from_the_config(bundle, scene_files, monkeypatch):
    img = prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")
    assert _estimate_settings(bundle, img, monkeypatch, "share_parts", share_parts=True) == [True, True]


def _estimate_settings(bundle, img, monkeypatch, key: str, **config) -> list:
    """The `key` argument each mask estimate of a short run with `config` was given."""
    seen = []
    real = em_loop.estimate_masks

    def spy(*a, **kw):
        seen.append(kw.get(key))
        return real(*a, **kw)

    monkeypatch.setattr(em_loop, "estimate_masks", spy)
    learn(bundle, [img], start_state(bundle, [img], _cfg(**config)), progress=False)
    return seen


def test_a_concept_whose_mask_moved_starts_again_from_its_initial_vector(bundle, scene_files, monkeypatch):
    img = prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2]")
    h, w = img.size[1], img.size[0]
    first = np.zeros((2, h, w), dtype=bool)
    first[0, : h // 2, : w // 2] = True  # [v1] top left, then bottom right: moved
    first[1, h // 2:, : w // 2] = True  # [v2] stays
    moved = first.copy()
    moved[0] = False
    moved[0, h // 2:, w // 2:] = True
    estimates = iter([first, moved])
    monkeypatch.setattr(em_loop, "estimate_masks", lambda *a, **kw: (next(estimates), None))
    seen = []
    real_step = em_loop._Run.token_step

    def spy(self, capture):
        seen.append((self.state.step, self.vectors.detach().clone(), self.state.concepts.vectors.clone()))
        return real_step(self, capture)

    monkeypatch.setattr(em_loop._Run, "token_step", spy)
    cfg = _cfg(steps=3, restart_moved=0.5, lr=1e-2)
    start = start_state(bundle, [img], cfg)
    state = learn(bundle, [img], start, progress=False)
    refresh = state.history["refreshes"][-1]
    assert refresh["step"] == 2 and refresh["restarted"] == ["[v1]"]
    step, vectors, saved = seen[2]
    assert step == 2
    init = start.concepts.vectors
    assert torch.equal(vectors[0].cpu(), init[0]) and torch.equal(saved[0], init[0])  # a resume starts there too
    assert not torch.allclose(vectors[1].cpu(), init[1])  # [v2] kept what it learned
    # Off (the default): nothing restarts, and the record says nothing of it.
    estimates = iter([first, moved])
    seen.clear()
    state = learn(bundle, [img], start_state(bundle, [img], _cfg(steps=3, lr=1e-2)), progress=False)
    assert "restarted" not in state.history["refreshes"][-1]
    assert not torch.allclose(seen[2][1][0].cpu(), init[0])
    with pytest.raises(ValueError, match="restart_moved"):
        _cfg(restart_moved=1.0)
