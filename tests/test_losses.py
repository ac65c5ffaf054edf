import torch

from em_core.losses import attention_loss, masked_diffusion_loss, outside_loss


def test_masked_loss_ignores_everything_outside_the_union():
    target = torch.randn(1, 4, 8, 8)
    pred = target.clone()
    union = torch.zeros(1, 1, 8, 8)
    union[..., :4, :] = 1
    pred[..., 4:, :] += 10.0  # wrong only outside the mask
    assert masked_diffusion_loss(pred, target, union) == 0
    pred[..., 0, 0] += 1.0
    assert masked_diffusion_loss(pred, target, union) > 0
    assert masked_diffusion_loss(pred, target, None) > masked_diffusion_loss(pred, target, union)


def test_outside_loss_looks_only_outside_the_union_and_moves_only_the_prediction():
    base = torch.randn(1, 4, 8, 8)
    union = torch.zeros(1, 1, 8, 8)
    union[..., :4, :] = 1
    pred = base.clone().requires_grad_(True)
    with torch.no_grad():
        pred[..., :4, :] += 10.0  # different only inside the mask
    assert outside_loss(pred, base, union) == 0
    with torch.no_grad():
        pred[..., 7, 7] += 2.0
    loss = outside_loss(pred, base, union)
    assert torch.isclose(loss, torch.tensor(4.0 * 4 / base.numel()))  # averaged over every element
    loss.backward()
    assert pred.grad[..., :4, :].abs().sum() == 0 and pred.grad[..., 7, 7].abs().sum() > 0


def test_attention_loss_is_zero_for_a_map_shaped_like_its_mask_and_skips_absent_concepts():
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 0, :2] = 1
    mask[0, 1, 2:] = 1
    maps = mask * 0.3  # scaled by its max -> equal to the mask
    present = torch.tensor([[True, True]])
    assert attention_loss(maps, mask, present) < 1e-10
    wrong = maps.clone()
    wrong[0, 1] = 0.3 - wrong[0, 1]
    assert torch.isclose(attention_loss(wrong, mask, present), torch.tensor(1.0))  # 0 + 1
    assert attention_loss(wrong, mask, torch.tensor([[True, False]])) < 1e-10


def test_attention_loss_sums_over_present_concepts_and_averages_over_the_batch():
    """Break-A-Scene's reduction: the per-mask MSEs add up, divided by the batch size."""
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]],     # concept 0: map / max = [[1, 0], [0, 0]]
                          [[2.0, 2.0], [0.0, 0.0]],     # concept 1: [[1, 1], [0, 0]]
                          [[4.0, 0.0], [0.0, 0.0]]]])   # concept 2: absent from the step
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]],    # concept 0: one of four cells wrong -> MSE 1/4
                           [[0.0, 0.0], [1.0, 1.0]],    # concept 1: all four wrong -> MSE 1
                           [[0.0, 0.0], [0.0, 0.0]]]])
    present = torch.tensor([[True, True, False]])
    assert torch.isclose(attention_loss(maps, masks, present), torch.tensor(1.25))  # 1/4 + 1, not their mean
    # A batch of two: the same item twice, then the second without concept 1: (1.25 + 0.25) / 2.
    both = attention_loss(maps.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1, 1),
                          torch.tensor([[True, True, False], [True, False, False]]))
    assert torch.isclose(both, torch.tensor(0.75))
    assert attention_loss(maps, masks, torch.zeros(1, 3, dtype=torch.bool)) == 0


def test_attention_loss_brings_masks_to_the_map_grid_with_nearest():
    """As BaS's F.interpolate(mask, size=(16, 16)): each cell takes one pixel (its top-left here),
    so a mask stays binary rather than turning into area fractions."""
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 1  # one pixel of the top-left 2x2 cell
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert attention_loss(maps, mask, torch.tensor([[True]])) < 1e-10  # area would give 0.25 there: MSE 0.14


def test_attention_loss_resizes_masks_to_the_map_grid():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    maps = torch.zeros(1, 1, 4, 4)
    maps[..., :2, :] = 0.5
    assert attention_loss(maps, mask, torch.tensor([[True]])) < 1e-10
