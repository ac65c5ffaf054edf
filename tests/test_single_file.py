"""Single-file LDM checkpoints (the layout ComfyUI and A1111 use), offline, never unpickled."""
import pytest
import torch
from safetensors.torch import save_file

from em_core.ldm_layout import bundle_to_ldm
from em_core.model import load_bundle
from em_core.sd_configs import FAMILIES, detect_family
from em_core.single_file import clip_tokenizer, load_single_file, state_dict_to_bundle
from em_core.tiny_model import build_model


@pytest.mark.slow
def test_sd15_shaped_checkpoint_round_trips_both_ways(tmp_path):
    torch.set_num_threads(2)
    model = build_model("sd15", seed=0)
    ldm = bundle_to_ldm(model)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in ldm and ldm[
        "first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in ldm
    back = state_dict_to_bundle(dict(ldm))  # LDM -> diffusers, by diffusers' own converters
    for ours, theirs in ((model.unet, back.unet), (model.vae, back.vae), (model.text_encoder, back.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = bundle_to_ldm(back)  # and diffusers -> LDM gives the original keys and values
    assert set(again) == set(ldm) and all(torch.equal(again[k], ldm[k]) for k in ldm)
    del back, again
    # Through a file, in half precision to keep the test's disk use small.
    path = tmp_path / "sd15.safetensors"
    save_file({k: v.half() for k, v in ldm.items()}, str(path))
    del ldm
    loaded = load_bundle(path, dtype=torch.float16)
    assert loaded.source == str(path.resolve()) and loaded.default_resolution == 512
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight.half())
    assert loaded.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_refusals(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 pickled")
    with pytest.raises(ValueError, match="never loaded"):
        load_single_file(ckpt)
    cut = tmp_path / "cut.safetensors"
    save_file({"x": torch.zeros(1000)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_single_file(cut)
    with pytest.raises(ValueError, match="no SD 1.x / 2.x text encoder"):
        detect_family({"model.diffusion_model.x": 0})
    with pytest.raises(ValueError, match="SDXL"):
        detect_family({"conditioner.embedders.1.model.x": 0})
    assert detect_family({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": 0}) == "sd2"
    tiny = bundle_to_ldm(build_model("tiny"))
    with pytest.raises(ValueError, match="right model family|lacks"):
        state_dict_to_bundle(tiny)


def test_shipped_configs_fit_together():
    from diffusers import UNet2DConditionModel

    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.convert_ids_to_tokens(49407) == "<|endoftext|>"
    assert clip_tokenizer("!").pad_token == "!"
    for family, cfg in FAMILIES.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg["unet"])
        assert unet.config.cross_attention_dim == cfg["text"]["hidden_size"], family
    assert FAMILIES["sd2"]["scheduler"]["prediction_type"] == "v_prediction"
