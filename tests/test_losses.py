import torch

from em_core.losses import attention_loss, masked_diffusion_loss


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


def test_attention_loss_is_zero_for_a_map_shaped_like_its_mask_and_skips_absent_concepts():
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 0, :2] = 1
    mask[0, 1, 2:] = 1
    maps = mask * 0.3  # scaled by its max -> equal to the mask
    present = torch.tensor([[True, True]])
    assert attention_loss(maps, mask, present) < 1e-10
    wrong = maps.clone()
    wrong[0, 1] = 0.3 - wrong[0, 1]
    assert attention_loss(wrong, mask, present) > 0.4
    assert attention_loss(wrong, mask, torch.tensor([[True, False]])) < 1e-10


def test_attention_loss_resizes_masks_to_the_map_grid():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    maps = torch.zeros(1, 1, 4, 4)
    maps[..., :2, :] = 0.5
    assert attention_loss(maps, mask, torch.tensor([[True]])) < 1e-10
