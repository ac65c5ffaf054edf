"""An SD-1.5-shaped random model at 256 px: nothing may assume 512 px or the tiny model's sizes."""
import numpy as np
import pytest

from conftest import real_scenes
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state

SCENES = real_scenes()


@pytest.mark.slow
@pytest.mark.skipif(not SCENES, reason="../shared/data/scenes is not beside the checkout")
def test_sd15_shaped_model_learns_at_256px(tmp_path, sd15_model):
    bundle = sd15_model
    assert bundle.default_resolution == 512 and bundle.pixel_granularity == 64
    image = prepare_image(bundle, SCENES[0] / "img.jpg", "a photo of [v1] and [v2] in [v3]", resolution=256)
    assert image.size == (256, 256) and image.latent_hw == (32, 32)
    cfg = LearnConfig(steps=2, refresh_every=1, mask_timesteps=2, refresh_timesteps=2, mask_batch=2, resolution=256,
                      save_every=10)
    state = learn(bundle, [image], start_state(bundle, [image], cfg, {"[v1]": "dog"}), out=tmp_path / "r",
                  progress=False)
    assert state.status == "done" and state.step == 2
    assert state.masks[0].shape == (3, 256, 256)
    assert state.mask_history[-1]["masks"][0].shape == (3, 32, 32)
    assert all(np.isfinite(h["loss"]) and h["attn_loss"] > 0 for h in state.history["steps"])
    assert (tmp_path / "r" / "masks" / "img1_v3.png").is_file()
