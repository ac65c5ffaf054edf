"""A world copy whose VAE decoder is tuned on every shape: the encoder, the denoiser and the text
encoder stay byte for byte as they were, so every latent is the same and only its decoding moves."""
import json

import pytest
from safetensors.torch import load_file

from em_core.tiny_world.checker import SHAPE_NAMES, Checker, save_checker
from em_core.tiny_world.decoder_tune import tune_decoder
from em_core.tiny_world.tiny_model import save_bundle
from em_core.tiny_world.world_train import build_world_model


def test_tuned_decoder_keeps_encoder_and_denoiser_and_refuses_bad_folders(tmp_path):
    world = tmp_path / "world"
    save_bundle(build_world_model(0), world)
    save_checker(Checker(), world / "checker.safetensors", {})
    rec = tune_decoder(world, tmp_path / "tuned", steps=2, batch=2, log=lambda *a: None, check_images=12)
    tuned = tmp_path / "tuned"
    assert not (tmp_path / "tuned.writing").exists()
    old, new = (load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors")) for d in (world, tuned))
    assert old.keys() == new.keys()
    enc = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in old if k.startswith("decoder.")]
    assert enc and all(old[k].equal(new[k]) for k in enc)
    assert any(not old[k].equal(new[k]) for k in dec)
    for part in ("unet", "text_encoder"):
        f = next((world / part).glob("*.safetensors")).name
        assert (world / part / f).read_bytes() == (tuned / part / f).read_bytes()
    record = json.loads((tuned / "training.json").read_text())["decoder_tune"]
    assert record == json.loads(json.dumps(rec)) and record["steps"] == 2
    assert set(record["roundtrip_after"]) == set(SHAPE_NAMES)
    assert record["command"] in (tuned / "README.md").read_text()
    quoted = json.loads((tuned / "decoder_tune.json").read_text())
    assert quoted["roundtrip_after"] == record["roundtrip_after"] and quoted["config"]["steps"] == 2
    assert {"command", "commit", "machine"} <= set(quoted)
    with pytest.raises(ValueError, match="out: .* already exists"):
        tune_decoder(world, tuned, steps=1, batch=1, check_images=1)
    with pytest.raises(ValueError, match="model: .* not a tiny world folder"):
        tune_decoder(tmp_path / "nothing", tmp_path / "t2", steps=1, batch=1)
