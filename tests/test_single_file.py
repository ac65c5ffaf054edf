"""Single-file LDM checkpoints (the layout ComfyUI and A1111 use), offline, never unpickled."""
import pytest
import torch
from safetensors.torch import save_file

from em_core.model_io.ldm_layout import bundle_to_ldm
from em_core.model_io import load_bundle
from em_core.model_io.sd_configs import FAMILIES, detect_family
from em_core.model_io.single_file import clip_tokenizer, load_single_file, state_dict_to_bundle
from em_core.tiny_world.tiny_model import build_model


@pytest.mark.slow
def test_sd15_shaped_checkpoint_round_trips_both_ways(tmp_path, sd15_model):
    model = sd15_model
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
    with pytest.raises(ValueError, match="cut.safetensors is truncated"):
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
        widths = cfg["text"]["hidden_size"] + cfg.get("text_2", {}).get("hidden_size", 0)  # SDXL: both, end to end
        assert unet.config.cross_attention_dim == widths, family
    assert FAMILIES["sd2"]["scheduler"]["prediction_type"] == "v_prediction"


# SD 2.x's two kinds (issue 16, part 5): SD 2.1-base is 512 px epsilon, SD 2.1 is 768 px v-prediction,
# and a single file has the same weight names and shapes either way.
SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SD15_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def test_prediction_type_of_a_single_file():
    from em_core.model_io.single_file import prediction_type_of

    assert prediction_type_of("sd15", {SD15_KEY}) == "epsilon"  # SD 1.x: always epsilon unless told
    assert prediction_type_of("sd15", {SD15_KEY, "v_pred"}) == "epsilon"
    assert prediction_type_of("sd2", {SD2_KEY, "v_pred"}) == "v_prediction"  # ComfyUI's Checkpoint Save marker
    assert prediction_type_of("sd2", {SD2_KEY}, "epsilon") == "epsilon"
    assert prediction_type_of("sd2", {SD2_KEY, "v_pred"}, "epsilon") == "epsilon"  # given wins
    with pytest.raises(ValueError, match=r"--prediction-type epsilon or v_prediction.*prediction_type input.*"
                                         r"2\.1-base.*epsilon at 512 px.*v_prediction at 768 px"):
        prediction_type_of("sd2", {SD2_KEY})
    with pytest.raises(ValueError, match="not one of"):
        prediction_type_of("sd2", {SD2_KEY}, "sample")


def test_family_config_sets_the_side_from_the_prediction_type():
    from em_core.model_io.sd_configs import family_config

    base, v = family_config("sd2", "epsilon"), family_config("sd2", "v_prediction")
    assert base["scheduler"]["prediction_type"] == "epsilon" and base["unet"]["sample_size"] * 8 == 512
    assert v["scheduler"]["prediction_type"] == "v_prediction" and v["unet"]["sample_size"] * 8 == 768
    assert FAMILIES["sd2"]["unet"]["sample_size"] == 96  # the table itself is not changed
    sd15 = family_config("sd15")
    assert sd15["scheduler"]["prediction_type"] == "epsilon" and sd15["unet"]["sample_size"] * 8 == 512
    with pytest.raises(ValueError, match="needs it"):
        family_config("sd2")


def test_an_sd2_file_without_its_type_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    import em_core.model_io.single_file as sf

    path = tmp_path / "sd21.safetensors"
    save_file({SD2_KEY: torch.zeros(3, 1)}, str(path))
    monkeypatch.setattr(sf, "load_file", lambda *a, **k: pytest.fail("weights read before the type was known"))
    with pytest.raises(ValueError, match="does not say whether it predicts epsilon or v"):
        load_single_file(path)
    with pytest.raises(ValueError, match="does not say"):
        load_bundle(path)


class _Built:
    def to(self, **kwargs):
        return self


def test_the_given_type_reaches_the_bundle(tmp_path, monkeypatch):
    import em_core.model_io.single_file as sf

    seen = []
    monkeypatch.setattr(sf, "_assemble", lambda family, u, v, t, prediction, source, dtype=None:
                        seen.append((family, prediction)) or _Built())
    sd2, sd15, marked = tmp_path / "sd2.safetensors", tmp_path / "sd15.safetensors", tmp_path / "v.safetensors"
    save_file({SD2_KEY: torch.zeros(1)}, str(sd2))
    save_file({SD15_KEY: torch.zeros(1)}, str(sd15))
    save_file({SD2_KEY: torch.zeros(1), "v_pred": torch.zeros(0)}, str(marked))
    load_bundle(sd2, prediction_type="epsilon")
    load_bundle(sd2, prediction_type="v_prediction")
    load_bundle(sd15)
    load_bundle(marked)
    assert seen == [("sd2", "epsilon"), ("sd2", "v_prediction"), ("sd15", "epsilon"), ("sd2", "v_prediction")]


def test_bridged_sd2_needs_comfyuis_type():
    from em_core.model_io.single_file import bundle_from_comfy

    with pytest.raises(ValueError, match="prediction_type"):
        bundle_from_comfy({}, {"clip_h.transformer.text_model.x": torch.zeros(1)}, {}, None)


def test_a_diffusers_folder_keeps_its_own_type(tiny_dir):
    assert load_bundle(tiny_dir, prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="for single files only"):
        load_bundle(tiny_dir, prediction_type="v_prediction")


def test_cli_takes_the_prediction_type_and_refuses_an_unknown_sd2_file(tmp_path, capsys, scene_files):
    from em_core.cli import build_parser, main

    parser = build_parser()
    for cmd in (["learn", "--model", "m", "--out", "o"], ["finetune", "--state", "s"],
                ["generate", "--model", "m", "--prompt", "p", "--out", "o"]):
        assert parser.parse_args(cmd + ["--prediction-type", "epsilon"]).prediction_type == "epsilon"
        assert parser.parse_args(cmd).prediction_type is None
    with pytest.raises(SystemExit):
        parser.parse_args(["learn", "--model", "m", "--out", "o", "--prediction-type", "x0"])
    capsys.readouterr()
    path = tmp_path / "sd21.safetensors"
    save_file({SD2_KEY: torch.zeros(1)}, str(path))
    image = str(scene_files[0][0])
    assert main(["learn", "--model", str(path), "--image", image, "--prompt", "[v1]", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--prediction-type" in err and "SD 2.1-base" in err
