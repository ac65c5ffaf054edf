"""SDXL: a tiny SDXL-shaped model (the real classes: text_time U-Net with no cross-attention at its
finest level and two transformer layers at its coarsest, CLIPTextModel + CLIPTextModelWithProjection
of different widths, two tokenizers), and SDXL base 1.0's real layout on the meta device where names
and shapes matter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from em_core.attention import AttentionCapture, concept_selector, select_layers
from em_core.concept_file import load_concepts
from em_core.concepts import ConceptSet, encode_text, injected, unet_inputs
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.generate import generate
from em_core.model_io import load_bundle
from em_core.tiny_world.tiny_model import SDXL, TINY_XL, make_tiny_model

from conftest import exported_lora_names, peft_lora_tensors

PROMPT = "a photo of [v1] and [v2] on [v3]"


@pytest.fixture(scope="session")
def xl_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_xl") / "model", seed=0, kind="tiny_xl")


@pytest.fixture
def xl(xl_dir):
    return load_bundle(xl_dir)


@pytest.fixture(scope="session")
def xl_learned(xl_dir, scene_files, tmp_path_factory):
    """Three EM steps on the tiny SDXL with a mask refresh, saved to a run folder."""
    b = load_bundle(xl_dir)
    images = [prepare_image(b, scene_files[0][0], PROMPT)]
    cfg = LearnConfig(steps=3, refresh_every=2, mask_timesteps=4, refresh_timesteps=2, mask_batch=4)
    out = tmp_path_factory.mktemp("xl_run") / "run"
    state = learn(b, images, start_state(b, images, cfg, {"[v1]": "red"}), out=out, progress=False)
    return images, state, out


def test_an_sdxl_folder_loads_offline_as_sdxl(xl_dir, xl, tiny_dir):
    assert xl.is_xl and xl.family == "sdxl" and load_bundle(tiny_dir).family == "sd"
    assert [type(t).__name__ for t in xl.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert xl.tokenizers[1].pad_token == "!" and xl.tokenizers[0].pad_token == "<|endoftext|>"
    assert xl.unet.config.addition_embed_type == "text_time"
    assert list(xl.text_modules()) == ["text_encoder", "text_encoder_2"]
    # Sizes follow the model: three U-Net levels (granularity 4) on a 4x VAE.
    assert xl.default_resolution == 64 and xl.pixel_granularity == 16
    # diffusers itself reads the folder as an SDXL pipeline.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    assert pipe.text_encoder_2.config.projection_dim == TINY_XL["text_2"]["projection_dim"]


def test_a_partial_sdxl_folder_is_refused(xl_dir, tmp_path):
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(xl_dir, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        load_bundle(broken)
    shutil.rmtree(broken / "text_encoder_2")  # now an SDXL U-Net with one text encoder
    with pytest.raises(ValueError, match="SDXL's"):
        load_bundle(broken)


def test_each_concept_is_a_token_in_both_encoders(xl):
    widths = [TINY_XL["text"]["hidden_size"], TINY_XL["text_2"]["hidden_size"]]
    concepts = ConceptSet.create(xl, ["[v1]", "[v2]"], {"[v1]": "red"})
    assert concepts.vectors.shape == (2, sum(widths))
    # The init word's rows of each encoder's own table, end to end.
    ids = xl.tokenizer("red", add_special_tokens=False).input_ids
    own = [te.get_input_embeddings().weight[ids].mean(0) for te in xl.text_encoders]
    assert torch.allclose(concepts.vectors[0], torch.cat(own))
    tables = [te.get_input_embeddings().weight.clone() for te in xl.text_encoders]
    other = concepts.copy()
    # Move only the second encoder's half, by a vector that is not constant: adding the same number
    # to every component is invisible after a LayerNorm, so the pooled text would move only by
    # rounding (it did: ~1e-6, which passed or failed allclose by chance of the random weights).
    other.vectors[0, widths[0]:] += torch.linspace(-1.0, 1.0, widths[1])
    with torch.no_grad():
        with injected(xl, concepts):
            a = encode_text(xl, ["a photo of [v1]"])
        with injected(xl, other):
            b = encode_text(xl, ["a photo of [v1]"])
    assert a.hidden.shape == (1, 77, sum(widths)) and a.pooled.shape == (1, TINY_XL["text_2"]["projection_dim"])
    assert torch.equal(a.hidden[..., :widths[0]], b.hidden[..., :widths[0]])
    assert not torch.allclose(a.hidden[..., widths[0]:], b.hidden[..., widths[0]:])
    assert (a.pooled - b.pooled).abs().max() > 1e-2
    assert all(torch.equal(t, te.get_input_embeddings().weight) for t, te in zip(tables, xl.text_encoders))
    with pytest.raises(RuntimeError, match="not injected"):
        encode_text(xl, ["a photo of [v1]"])


def test_prompt_encoding_is_the_sdxl_pipelines_own(xl):
    """Without concepts, encode_text gives what StableDiffusionXLPipeline.encode_prompt gives: both
    encoders' penultimate states end to end and encoder 2's pooled projection."""
    from em_core.generate import make_pipeline

    prompt = "a red circle and a blue square on grass"
    with torch.no_grad():
        ours = encode_text(xl, [prompt])
        embeds, _, pooled, _ = make_pipeline(xl).encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(ours.hidden, embeds, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    kw = unet_inputs(xl, ours, 3, target_hw=(64, 48), original_hw=(480, 640))
    assert kw["encoder_hidden_states"].shape[0] == 3
    assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[480, 640, 0, 0, 64, 48]] * 3
    assert kw["added_cond_kwargs"]["text_embeds"].shape == (3, TINY_XL["text_2"]["projection_dim"])


def test_a_prompt_too_long_for_an_encoder_names_the_concept_that_fell_off(xl, scene_files):
    long = "a photo of " + " and ".join(["a small red circle"] * 18) + " and [v2]"
    with pytest.raises(ValueError, match=r"text encoder 1 \(CLIP ViT-L\) reads 75; \[v2\] would fall off"):
        prepare_image(xl, scene_files[0][0], long)


def test_layers_follow_the_model_tiny_xl(xl):
    coarse, every = select_layers(xl.unet, "coarse"), select_layers(xl.unet, "all")
    # No cross-attention at the finest level (down_blocks.0, up_blocks.2); both transformer layers
    # of the coarsest blocks are read.
    assert not any(n.startswith(("down_blocks.0", "up_blocks.2")) for n in every)
    assert set(coarse.values()) == {4} and len(coarse) == 2 + 4
    assert all(n.startswith(("down_blocks.2", "up_blocks.0")) for n in coarse)
    assert set(every.values()) == {2, 4} and len(every) == 1 + 2 + 2 + 4 + 2
    concepts = ConceptSet.create(xl, ["[v1]", "[v2]"])
    with torch.no_grad(), injected(xl, concepts):
        cond = encode_text(xl, ["a photo of [v1] and [v2]"])
    select = concept_selector(cond.ids, concepts.token_ids(xl))
    x = torch.randn(1, 4, 32, 16)  # a 128 x 64 px image: maps follow the image's size too
    for mode, hw in (("coarse", (8, 4)), ("all", (16, 8))):
        with torch.no_grad(), AttentionCapture(xl.unet, mode) as cap:
            out, maps = cap.run(select, (32, 16), lambda: xl.unet(
                x, torch.tensor([500]), **unet_inputs(xl, cond, 1, target_hw=(128, 64))).sample)
        assert out.shape == x.shape and maps.shape == (1, 2, *hw)
        assert torch.allclose(maps.sum((-1, -2)) > 0, torch.tensor(True))


def test_layers_follow_sdxl_base_real_layout():
    """SDXL base 1.0's U-Net (meta device): 70 cross-attention layers in 3+2 blocks with 2 and 10
    transformer layers; Break-A-Scene's coarse layers are the 50 at 1/4 of the latent, 32x32 at 1024 px."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL["unet"])
    coarse, every = select_layers(unet, "coarse"), select_layers(unet, "all")
    assert len(every) == 70 and len(coarse) == 50 and set(coarse.values()) == {4}
    assert set(every.values()) == {2, 4}
    latent = 1024 // 8
    assert {latent // f for f in coarse.values()} == {32} and {latent // f for f in every.values()} == {32, 64}


def test_em_learns_on_tiny_sdxl_and_estimates_masks(xl_learned, xl_dir, tiny_dir):
    images, state, out = xl_learned
    assert state.status == "done" and state.step == 3
    assert [r["kind"] for r in state.history["refreshes"]] == ["init", "refresh"]
    assert state.masks[0].shape == (3, 64, 64) and state.masks[0].dtype == bool
    assert all(np.isfinite(h["loss"]) for h in state.history["steps"])
    assert state.concepts.vectors.shape == (3, 80)
    # The concept file reads back on its model, and is refused on the other family either way round.
    cb = load_concepts(out / "concepts.safetensors", load_bundle(xl_dir))
    assert torch.equal(cb.concepts.vectors, state.concepts.vectors) and cb.meta["base_model"]["family"] == "sdxl"
    with pytest.raises(ValueError, match="Stable Diffusion XL .* is Stable Diffusion 1.x / 2.x"):
        load_concepts(out / "concepts.safetensors", load_bundle(tiny_dir), allow_other_model=True)


def test_an_sd_bundle_is_refused_on_sdxl(bundle, scene_files, xl, tmp_path):
    images = [prepare_image(bundle, scene_files[0][0], "a photo of [v1]")]
    cfg = LearnConfig(steps=1, refresh_every=0, mask_timesteps=2, mask_batch=2)
    learn(bundle, images, start_state(bundle, images, cfg), out=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"Stable Diffusion 1.x / 2.x .* is Stable Diffusion XL .* Load a SD 1.x"):
        load_concepts(tmp_path / "run" / "concepts.safetensors", xl, allow_other_model=True)


def test_generation_on_tiny_sdxl_uses_the_concepts(xl):
    concepts = ConceptSet.create(xl, ["[v1]", "[v2]"], {"[v1]": "red"})
    kw = dict(concepts=concepts, steps=2, seed=3, progress=False)
    for scheduler in ("euler", "ddim", "dpmpp_2m"):
        a = generate(xl, "a photo of [v1] and [v2]", scheduler=scheduler, **kw)
        assert a[0].size == (64, 64)
    again = generate(xl, "a photo of [v1] and [v2]", scheduler="dpmpp_2m", **kw)
    assert np.array_equal(np.asarray(a[0]), np.asarray(again[0]))
    moved = concepts.copy()
    moved.vectors += 0.5
    other = generate(xl, "a photo of [v1] and [v2]", scheduler="dpmpp_2m", **dict(kw, concepts=moved))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_and_export_on_tiny_sdxl(xl, xl_learned, tmp_path, mode):
    """The joint fine-tune trains the U-Net and both text encoders; the export is one embedding file per
    concept with its clip_l and clip_g rows, and a LoRA in kohya keys for all three."""
    from safetensors.torch import load_file

    from em_core.concept_file import save_concepts
    from em_core.export import export_concepts
    from em_core.finetune import FinetuneConfig, finetune
    from em_core.weights import applied

    images, state, _ = xl_learned
    out = finetune(xl, images, state, FinetuneConfig(steps=2, mode=mode, rank=2, lr=1e-3), progress=False)
    assert out.finetune["status"] == "done"
    assert out.weights.components() == ["text_encoder", "text_encoder_2", "unet"]
    save_concepts(out, xl, tmp_path / "c.safetensors")
    cb = load_concepts(tmp_path / "c.safetensors", xl)
    assert cb.meta["base_model"]["text_dims"] == [32, 48]
    written = export_concepts(cb, tmp_path / "export", "fam", rank=2)
    for concept, file in zip(cb.names, written["embeddings"]):
        emb = load_file(file)
        vec = cb.concepts.vectors[cb.concepts.index(concept)]
        assert set(emb) == {"clip_l", "clip_g"}
        assert torch.equal(emb["clip_l"][0], vec[:32]) and torch.equal(emb["clip_g"][0], vec[32:])
    lora = load_file(written["lora"])
    prefixes = {k.split(".")[0][:9] for k in lora}
    assert {"lora_te1_", "lora_te2_", "lora_unet"} == prefixes
    if mode == "lora":
        assert not written["skipped"]
    # The tuned weights apply to the SDXL U-Net and both encoders for a generation only.
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    with torch.no_grad(), injected(xl, cb.concepts):
        cond = encode_text(xl, ["a photo of [v1]"])
        kw = unet_inputs(xl, cond, 1, target_hw=(64, 64))
        base = xl.unet(x, t, **kw).sample
        with applied(xl, cb.weights):
            tuned = xl.unet(x, t, **kw).sample
            tuned_text = encode_text(xl, ["a photo of [v1]"])
        again = xl.unet(x, t, **kw).sample
    assert not torch.allclose(base, tuned) and torch.equal(base, again)
    assert not torch.allclose(tuned_text.pooled, cond.pooled)


def test_exported_sdxl_loras_carry_only_keys_comfyui_loads():
    """SDXL base 1.0's U-Net and both text encoders (meta device, names and shapes only): every key
    either fine-tune mode exports is one ComfyUI's LoRA loader maps for SDXL (tests/data, from
    comfy.lora at a125cd84), every Linear / Conv2d of the U-Net and every attention / MLP layer of both
    encoders (and encoder 2's projection) is covered, and nothing a LoRA fine-tune trains is lost."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from em_core.export import kohya_name
    from em_core.weights import TunedWeights

    accepted = json.loads((Path(__file__).parent / "data" / "comfyui_lora_keys_sdxl.json").read_text())
    known = set(accepted["unet"]) | set(accepted["clip"])
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**SDXL["unet"]),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SDXL["text"])),
                   "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **SDXL["text_2"]))}

    def exported(weights) -> dict:
        return exported_lora_names(weights, known)

    peft_tensors = peft_lora_tensors(modules)
    lora = exported(TunedWeights("lora", peft_tensors, rank=1, alpha=1.0))
    te1 = {n for n in lora["names"] if n.startswith("lora_te1_")}
    te2 = {n for n in lora["names"] if n.startswith("lora_te2_")}
    # 70 transformer blocks x 2 attentions x (to_q, to_k, to_v, to_out.0); 12 and 32 encoder layers x 4.
    assert len(lora["names"]) - len(te1) - len(te2) == 560 and len(te1) == 48 and len(te2) == 128
    assert not lora["skipped"]

    full = {f"{comp}.{n}": torch.ones((1,) * p.ndim) for comp, m in modules.items() for n, p in m.named_parameters()}
    got = exported(TunedWeights("full", full))
    want = {kohya_name(comp, n, xl=True) for comp, module in modules.items() for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (comp == "unet" or ".layers." in n
                                                                      or n == "text_projection")}
    assert got["names"] == want
    assert sum(n.startswith("lora_unet_") for n in want) == sum(
        isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in modules["unet"].modules())
    assert sum(n.startswith("lora_te1_") for n in want) == 72 and sum(n.startswith("lora_te2_") for n in want) == 193


def _tiny_family(bundle) -> dict:
    """The 'sdxl' family's configs at the tiny model's widths (single files carry no config)."""
    from em_core.model_io.sd_configs import FAMILIES

    ids = lambda tok: dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,  # noqa: E731
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return dict(FAMILIES["sdxl"], unet=TINY_XL["unet"], vae=TINY_XL["vae"],
                text=dict(TINY_XL["text"], **ids(bundle.tokenizers[0])),
                text_2=dict(TINY_XL["text_2"], **ids(bundle.tokenizers[1])))


def test_sdxl_single_file_and_comfyui_state_dicts_load(xl, tmp_path, monkeypatch):
    """An SDXL checkpoint in the LDM layout (conditioner.embedders.0 CLIP-L, .1 OpenCLIP bigG with
    in_proj and a (width, projection) text_projection, label_emb) converts by diffusers' own code to
    the same weights, through a .safetensors file and from ComfyUI's MODEL / CLIP / VAE state dicts."""
    from safetensors.torch import save_file

    import em_core.model_io.single_file as sf
    from em_core.model_io.ldm_layout import UNET_PREFIX, VAE_PREFIX, bundle_to_ldm
    from em_core.model_io.sd_configs import detect_family

    ldm = bundle_to_ldm(xl)
    assert detect_family(ldm) == "sdxl"
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (48, 40)
    monkeypatch.setattr(sf, "family_config", lambda family, prediction=None: _tiny_family(xl))
    path = tmp_path / "xl.safetensors"
    save_file(ldm, str(path))
    from_file = load_bundle(path)
    clip = {f"clip_l.transformer.{k}": v for k, v in xl.text_encoders[0].state_dict().items()}
    clip.update({f"clip_g.transformer.{k}": v for k, v in xl.text_encoders[1].state_dict().items()})
    bridged = sf.bundle_from_comfy({k[len(UNET_PREFIX):]: v for k, v in ldm.items() if k.startswith(UNET_PREFIX)},
                                   clip, {k[len(VAE_PREFIX):]: v for k, v in ldm.items() if k.startswith(VAE_PREFIX)})
    for got in (from_file, bridged):
        assert got.family == "sdxl" and got.tokenizers[1].pad_token == "!"
        for ours, theirs in ((xl.unet, got.unet), (xl.vae, got.vae), *zip(xl.text_encoders, got.text_encoders)):
            a, b = ours.state_dict(), theirs.state_dict()
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = bundle_to_ldm(from_file)
    assert set(again) == set(ldm) and all(torch.equal(again[k], ldm[k]) for k in ldm)
    with pytest.raises(ValueError, match="clip_g"):
        sf.bundle_from_comfy({}, {k: v for k, v in clip.items() if k.startswith("clip_g")}, {})


def test_the_nodes_run_on_an_sdxl_model(xl, images, tmp_path, monkeypatch):
    """Attention Mask Init -> EM Token Step -> Joint Finetune -> Concept Generate on the tiny SDXL."""
    from nodes import host
    from nodes.learn_nodes import AttentionMaskInit, EMTokenStep, JointFinetune
    from nodes.output_nodes import ConceptGenerate

    monkeypatch.setattr(host, "resume_root", lambda: tmp_path / "resume")

    run, masks = AttentionMaskInit().run(xl, images[:1], PROMPT, "[v1]=red", 4, 0.5, 0, 0, 0)
    assert masks.shape == (3, 64, 64) and run.state.concepts.vectors.shape == (3, 80)
    run = EMTokenStep().run(xl, run, 1, 5e-4, 1e-2, 0, True, 4, True)[0]
    assert run.state.step == 1
    run = JointFinetune().run(xl, run, 1, 1e-3, "lora", 2, True, False, "fp32")[0]
    assert run.state.weights.components() == ["text_encoder", "text_encoder_2", "unet"]
    out, = ConceptGenerate().run(xl, run, "[v1] on [v3]", "", 0, 2, 5.0, 64, 64, 1, "euler")
    assert out.shape == (1, 64, 64, 3)
