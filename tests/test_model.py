import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from em_core.cli import main
from em_core.model_io import load_bundle


def test_make_tiny_model_cli_writes_a_diffusers_folder(tmp_path):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--seed", "3"]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    b = load_bundle(tmp_path / "m")
    assert b.tokenizer("a photo of a dog").input_ids[1:-1] == b.tokenizer.convert_tokens_to_ids(
        ["a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>"])
    # Nothing about the tiny model is hard-wired: its sizes come from its configs.
    assert b.default_resolution == 64 and b.vae_scale_factor == 4 and b.pixel_granularity == 8
    # The same seed gives the same weights.
    main(["make-tiny-model", str(tmp_path / "m2"), "--seed", "3"])
    assert torch.equal(load_bundle(tmp_path / "m2").unet.conv_in.weight, b.unet.conv_in.weight)


def test_seeds_differ(tmp_path):
    main(["make-tiny-model", str(tmp_path / "a"), "--seed", "1"])
    main(["make-tiny-model", str(tmp_path / "b"), "--seed", "2"])
    a, b = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_loading_the_diffusers_pipeline_offline(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)


def test_load_bundle_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="vae"):
        load_bundle(tmp_path / "half")


def test_make_tiny_model_refuses_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["make-tiny-model", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
