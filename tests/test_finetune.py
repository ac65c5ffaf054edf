import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from em_core.cli import main
from em_core.concept_file import load_concepts, save_concepts
from em_core.config import LearnConfig
from em_core.dataset import prepare_image
from em_core.em_loop import learn, start_state
from em_core.export import check_export_name, export_concepts, kohya_name, lora_from_delta
from em_core.finetune import FinetuneConfig, finetune
from em_core.generate import generate
from em_core.model_io import load_bundle
from em_core.weights import TunedWeights, applied

from conftest import exported_lora_names, peft_lora_tensors

DATA = Path(__file__).parent / "data"


@pytest.fixture
def learned(bundle, scene_files):
    images = [prepare_image(bundle, scene_files[0][0], "a photo of [v1] and [v2] on [v3]")]
    cfg = LearnConfig(steps=3, refresh_every=0, mask_timesteps=4, mask_batch=4)
    return images, learn(bundle, images, start_state(bundle, images, cfg, {"[v1]": "red"}), progress=False)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module, snap):
    sd = module.state_dict()
    return set(sd) == set(snap) and all(torch.equal(v, snap[k]) for k, v in sd.items())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_trains_a_delta_beside_an_untouched_base(bundle, learned, mode):
    images, state = learned
    unet, te = _snapshot(bundle.unet), _snapshot(bundle.text_encoder)
    cfg = FinetuneConfig(steps=3, mode=mode, lr=1e-3 if mode == "full" else 1e-2, rank=2)
    out = finetune(bundle, images, state, cfg, progress=False)
    assert out.finetune["status"] == "done" and out.finetune["step"] == 3
    assert _same(bundle.unet, unet) and _same(bundle.text_encoder, te)  # same keys, same values: no peft left
    w = out.weights
    assert w.kind == mode and w.components() == ["text_encoder", "unet"]
    assert all(torch.isfinite(t).all() for t in w.tensors.values())
    if mode == "full":
        assert not any("token_embedding" in k for k in w.tensors)  # the token table never trains
        assert any(bool(t.abs().sum() > 0) for t in w.tensors.values())
    else:
        assert all(".lora_A." in k or ".lora_B." in k for k in w.tensors)
    assert not torch.equal(out.concepts.vectors, state.concepts.vectors)
    assert state.weights is None  # the input state is untouched
    # Inside the context the model differs; outside it is the base again, bit for bit.
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    h = torch.randn(1, 77, 32)
    with torch.no_grad():
        base = bundle.unet(x, t, h).sample
        with applied(bundle, w):
            tuned = bundle.unet(x, t, h).sample
        again = bundle.unet(x, t, h).sample
    assert not torch.allclose(base, tuned) and torch.equal(base, again)


def test_finetune_options_and_refusals(bundle, learned):
    images, state = learned
    out = finetune(bundle, images, state, FinetuneConfig(steps=2, mode="lora", train_text_encoder=False,
                                                         gradient_checkpointing=True), progress=False)
    assert out.weights.components() == ["unet"]
    assert not bundle.unet.is_gradient_checkpointing and not bundle.unet.training
    stopped = finetune(bundle, images, state, FinetuneConfig(steps=5, mode="lora"), progress=False,
                       should_stop=lambda: True)
    assert stopped.finetune["status"] == "cancelled" and stopped.weights is not None
    with pytest.raises(ValueError, match="keep that mode"):
        finetune(bundle, images, out, FinetuneConfig(steps=3, mode="full"), progress=False)
    with pytest.raises(ValueError, match="mode='half'"):
        FinetuneConfig(mode="half")
    fresh = start_state(bundle, images, LearnConfig())
    with pytest.raises(ValueError, match="no masks yet"):
        finetune(bundle, images, fresh, progress=False)


def test_generation_is_seeded_and_the_concepts_change_it(bundle, learned):
    images, state = learned
    tuned = finetune(bundle, images, state, FinetuneConfig(steps=2, mode="lora", lr=1e-2), progress=False)
    kw = dict(steps=3, width=64, height=64, progress=False)
    prompt = "[v1] shaking hands with a robot in [v3]"
    a = generate(bundle, prompt, concepts=tuned.concepts, weights=tuned.weights, seed=3, n=2, **kw)
    b = generate(bundle, prompt, concepts=tuned.concepts, weights=tuned.weights, seed=3, n=2, **kw)
    c = generate(bundle, prompt, concepts=tuned.concepts, weights=tuned.weights, seed=4, n=1, **kw)
    plain = generate(bundle, "a robot", seed=3, **kw)
    without = generate(bundle, "a robot", concepts=tuned.concepts, weights=tuned.weights, seed=3, **kw)
    assert len(a) == 2 and a[0].size == (64, 64)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(without[0]))  # the LoRA changes the model
    dpm = generate(bundle, prompt, concepts=tuned.concepts, scheduler="dpmpp_2m", seed=3, **kw)
    assert dpm[0].size == (64, 64)
    with pytest.raises(ValueError, match=r"names \[v7\], which these concepts lack"):
        generate(bundle, "[v7] on a beach", concepts=tuned.concepts, **kw)
    with pytest.raises(ValueError, match=r"names \[v1\].*none"):
        generate(bundle, "[v1] on a beach", **kw)
    with pytest.raises(ValueError, match="width: 60 is not a positive multiple of 8"):
        generate(bundle, "a dog", width=60, height=64, steps=2, progress=False)
    with pytest.raises(ValueError, match="scheduler: unknown"):
        generate(bundle, "a dog", scheduler="magic", **kw)


def test_concept_file_checks_model_and_integrity(bundle, learned, tmp_path, tiny_dir):
    images, state = learned
    tuned = finetune(bundle, images, state, FinetuneConfig(steps=1, mode="lora"), progress=False)
    path = save_concepts(tuned, bundle, tmp_path / "c.safetensors")
    same = load_concepts(path, load_bundle(tiny_dir))  # a fresh load of the same model is recognised
    assert same.names == ["[v1]", "[v2]", "[v3]"] and same.weights.kind == "lora"
    assert torch.equal(same.concepts.vectors, tuned.concepts.vectors)
    assert np.array_equal(same.masks[0], tuned.masks[0])
    assert same.meta["history"]["finetune"][0]["phase"] == "finetune"
    from em_core.tiny_world.tiny_model import build_model

    other = build_model("tiny", seed=5)
    with pytest.raises(ValueError, match="learned on another base model"):
        load_concepts(path, other)
    assert load_concepts(path, other, allow_other_model=True).names == same.names
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is truncated"):
        load_concepts(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        load_concepts(tmp_path / "junk.safetensors")


def test_export_names_and_folders(bundle, learned, tmp_path):
    _, state = learned
    cb = load_concepts(save_concepts(state, bundle, tmp_path / "c.safetensors"))
    for bad in ["../evil", "a/b", "a\\b", "..", "", ".hidden"]:
        with pytest.raises(ValueError, match="not allowed"):
            check_export_name(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export_concepts(cb, tmp_path / "file", "ok")
    written = export_concepts(cb, tmp_path / "out", "mine")
    assert [p.name for p in written["embeddings"]] == ["mine_v1.safetensors", "mine_v2.safetensors",
                                                       "mine_v3.safetensors"]
    assert written["lora"] is None  # nothing fine-tuned yet: embeddings only
    emb = load_file(written["embeddings"][0])
    assert emb["clip_l"].shape == (1, 32) and torch.equal(emb["clip_l"][0], cb.concepts.vectors[0])


def test_full_delta_becomes_a_lora_that_reproduces_it():
    torch.manual_seed(0)
    lin = torch.randn(6, 2) @ torch.randn(2, 5)  # rank 2
    conv = (torch.randn(4, 1) @ torch.randn(1, 3 * 3 * 3)).reshape(4, 3, 3, 3)
    w = TunedWeights("full", {"unet.a.weight": lin, "unet.b.weight": conv, "unet.a.bias": torch.ones(6),
                              "text_encoder.encoder.layers.0.self_attn.q_proj.weight": lin,
                              "text_encoder.encoder.layers.0.layer_norm1.weight": torch.ones(5)})
    tensors, skipped = lora_from_delta(w, rank=2)
    up, down = tensors["lora_unet_a.lora_up.weight"], tensors["lora_unet_a.lora_down.weight"]
    assert torch.allclose(up @ down, lin, atol=1e-4)
    up, down = tensors["lora_unet_b.lora_up.weight"], tensors["lora_unet_b.lora_down.weight"]
    assert up.shape == (4, 2, 1, 1) and down.shape == (2, 3, 3, 3)
    assert torch.allclose((up.flatten(1) @ down.flatten(1)).reshape(conv.shape), conv, atol=1e-4)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert sorted(skipped) == ["text_encoder.encoder.layers.0.layer_norm1.weight", "unet.a.bias"]


@pytest.mark.parametrize("kind, data", [("sd15", "comfyui_lora_keys_sd15.json")])
def test_exported_lora_names_are_ones_comfyui_loads_for_sd15_modules(kind, data):
    """Names taken from ComfyUI's own key maps (tests/data) against an SD-1.5-shaped model's modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from em_core.tiny_world.tiny_model import SD15
    from em_core.weights import LORA_TARGETS

    accepted = json.loads((DATA / data).read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15["unet"])
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD15["text"]))
    conv_lin = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(conv_lin) > 250
    missing = [n for n in conv_lin if kohya_name("unet", n) not in accepted["unet"]]
    assert not missing, missing[:5]
    lora_mods = [n for n in conv_lin if n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or n.endswith("to_out.0")]
    assert all(kohya_name("unet", n) in accepted["unet"] for n in lora_mods)
    te_mods = [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)
               and n.rsplit(".", 1)[-1] in set(LORA_TARGETS["text_encoder"]) | {"fc1", "fc2"}]
    assert len(te_mods) == 72
    assert sorted(kohya_name("text_encoder", n) for n in te_mods) == sorted(accepted["clip"])


# Modules per family: (U-Net attention projections a LoRA fine-tune adapts, text-encoder layers).
# SD 2.x: 16 transformer blocks x 2 attentions x (to_q, to_k, to_v, to_out.0); OpenCLIP ViT-H used to
# its penultimate layer, so 23 of the 24 layers ComfyUI's map covers.
FAMILY_SIZES = {"sd15": (128, 12), "sd2": (128, 23)}


@pytest.mark.parametrize("family, prediction, data", [("sd15", None, "comfyui_lora_keys_sd15.json"),
                                                      ("sd2", "epsilon", "comfyui_lora_keys_sd2.json")])
def test_exported_loras_of_a_family_shaped_model_carry_only_keys_comfyui_loads(family, prediction, data):
    """Both fine-tune modes' exports, from a model built from the family's shipped config on the meta
    device (names and shapes, no weights): every key is one ComfyUI's LoRA loader maps for that
    family (tests/data, from comfy.lora at a125cd84), and nothing the loader could take is lost."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from em_core.model_io.sd_configs import family_config

    cfg = family_config(family, prediction)
    accepted = json.loads((DATA / data).read_text())
    known = set(accepted["unet"]) | set(accepted["clip"])
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**cfg["unet"]),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text"]))}
    n_attn, n_layers = FAMILY_SIZES[family]
    assert modules["text_encoder"].config.num_hidden_layers == n_layers

    def exported(weights) -> dict:
        return exported_lora_names(weights, known)

    # LoRA mode: the adapters peft puts on the targets, as finetune makes them (tiny stand-in tensors).
    peft_tensors = peft_lora_tensors(modules)
    lora = exported(TunedWeights("lora", peft_tensors, rank=1, alpha=1.0))
    te = {n for n in lora["names"] if n.startswith("lora_te_")}
    assert len(lora["names"]) - len(te) == n_attn and len(te) == 4 * n_layers and not lora["skipped"]

    # Full mode: a delta for every parameter (1-element stand-ins of the right rank); every Linear and
    # Conv2d weight of the U-Net and every attention / MLP weight of the text encoder becomes a LoRA.
    full = {f"{comp}.{n}": torch.ones((1,) * p.ndim) for comp, m in modules.items() for n, p in m.named_parameters()}
    got = exported(TunedWeights("full", full))
    want = {kohya_name(comp, n) for comp, module in modules.items() for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (comp == "unet" or ".layers." in n)}
    assert got["names"] == want and len(want) > 250
    assert sum(n.startswith("lora_te_") for n in got["names"]) == 6 * n_layers


def test_cli_learn_finetune_generate_export_reload(tiny_dir, scene_files, tmp_path, capsys):
    run, gen = tmp_path / "run", tmp_path / "gen"
    a = str(scene_files[0][0])
    assert main(["learn", "--model", str(tiny_dir), "--image", a, "--prompt", "a photo of [v1] and [v2] on [v3]",
                 "--steps", "2", "--refresh-every", "0", "--mask-timesteps", "4", "--out", str(run), "--quiet"]) == 0
    base_file = (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["finetune", "--state", str(run), "--steps", "2", "--mode", "full", "--lr", "1e-3", "--quiet"]) == 0
    assert (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == base_file
    concepts = run / "concepts.safetensors"
    args = ["generate", "--model", str(tiny_dir), "--prompt", "[v1] next to a robot", "--seed", "2", "--n", "1",
            "--steps", "3", "--quiet"]
    assert main([*args, "--concepts", str(concepts), "--out", str(gen)]) == 0
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a robot", "--seed", "2", "--steps", "3",
                 "--quiet", "--out", str(tmp_path / "plain")]) == 0
    from PIL import Image

    with_c = np.asarray(Image.open(gen / "seed2_00.png"))
    assert with_c.shape == (64, 64, 3)
    assert not np.array_equal(with_c, np.asarray(Image.open(tmp_path / "plain" / "seed2_00.png")))
    assert main(["export", "--concepts", str(concepts), "--out", str(tmp_path / "comfy"), "--name", "trio",
                 "--rank", "2"]) == 0
    lora = load_file(tmp_path / "comfy" / "loras" / "trio.safetensors")
    assert any(k.startswith("lora_unet_") for k in lora) and any(k.startswith("lora_te_") for k in lora)
    assert sorted(p.name for p in (tmp_path / "comfy" / "embeddings").iterdir()) == [
        "trio_v1.safetensors", "trio_v2.safetensors", "trio_v3.safetensors"]
    # Reload: the saved concept file generates the same image again.
    assert main([*args, "--concepts", str(concepts), "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(with_c, np.asarray(Image.open(tmp_path / "again" / "seed2_00.png")))
    assert main(["export", "--concepts", str(concepts), "--out", str(tmp_path / "x"), "--name", "../up"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main([*args, "--prompt", "[v8] here", "--concepts", str(concepts), "--out", str(gen)]) == 2
    assert "which these concepts lack" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_training(bundle, learned):
    images, state = learned
    runs = [finetune(bundle, images, state, FinetuneConfig(steps=2, mode="full", lr=1e-3, gradient_checkpointing=gc),
                     progress=False) for gc in (False, True)]
    losses = [[h["loss"] for h in r.history["finetune"]] for r in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = runs[0].weights.tensors, runs[1].weights.tensors
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_ctrl_c_during_finetune_keeps_what_was_learned(bundle, learned, tmp_path):
    from em_core.state import load_state

    images, state = learned

    def interrupt(s, info):
        if s.finetune["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(bundle, images, state, FinetuneConfig(steps=5, mode="lora", save_every=100), out=tmp_path / "r",
                 on_step=interrupt, progress=False)
    saved = load_state(tmp_path / "r")
    assert saved.finetune["status"] == "interrupted" and saved.finetune["step"] == 2
    assert saved.weights.kind == "lora" and (tmp_path / "r" / "concepts.safetensors").is_file()
    resumed = finetune(bundle, images, saved, FinetuneConfig(steps=4, mode="lora"), progress=False)
    assert resumed.finetune["step"] == 4 and len(resumed.history["finetune"]) == 4


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_later_stage_without_the_text_encoder_keeps_its_tuned_weights(bundle, learned, mode):
    images, state = learned
    te = _snapshot(bundle.text_encoder)
    lr = 1e-3 if mode == "full" else 1e-2
    first = finetune(bundle, images, state, FinetuneConfig(steps=1, mode=mode, lr=lr, rank=2), progress=False)
    te_first = first.weights.part("text_encoder")
    second = finetune(bundle, images, first, FinetuneConfig(steps=2, mode=mode, lr=lr, rank=2,
                                                             train_text_encoder=False), progress=False)
    assert second.weights.components() == ["text_encoder", "unet"]
    te_second = second.weights.part("text_encoder")
    assert set(te_second) == set(te_first) and all(torch.equal(te_second[k], te_first[k]) for k in te_first)
    assert any(not torch.equal(second.weights.part("unet")[k], v) for k, v in first.weights.part("unet").items())
    assert _same(bundle.text_encoder, te)  # and the base is still untouched
    if mode == "lora":
        with pytest.raises(ValueError, match="rank 2; continue with rank=2"):
            finetune(bundle, images, second, FinetuneConfig(steps=3, mode="lora", rank=8), progress=False)


def test_unet_params_train_only_the_named_part_of_the_unet(bundle, learned):
    images, state = learned
    unet = _snapshot(bundle.unet)
    cfg = FinetuneConfig(steps=2, mode="full", lr=1e-3, unet_params="cross_kv", train_text_encoder=False)
    out = finetune(bundle, images, state, cfg, progress=False)
    names = set(out.weights.part("unet"))
    kv = {n for n in dict(bundle.unet.named_parameters()) if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert out.weights.components() == ["unet"] and names == kv and kv
    assert _same(bundle.unet, unet)
    # Going on from an all-weights fine-tune keeps its other deltas, frozen, in the result.
    first = finetune(bundle, images, state, FinetuneConfig(steps=1, mode="full", lr=1e-3), progress=False)
    then = finetune(bundle, images, first, FinetuneConfig(steps=2, mode="full", lr=1e-3, unet_params="cross_kv"),
                    progress=False)
    before, after = first.weights.part("unet"), then.weights.part("unet")
    assert set(after) == set(before)
    assert all(torch.equal(after[n], d) for n, d in before.items() if n not in kv)
    assert any(not torch.equal(after[n], before[n]) for n in kv)
    blocks = finetune(bundle, images, state, FinetuneConfig(steps=1, mode="full", lr=1e-3, unet_params="attention",
                                                            train_text_encoder=False), progress=False)
    trained = set(blocks.weights.part("unet"))
    assert kv < trained and all(".attentions." in n for n in trained)
    assert any(".attn1." in n for n in trained) and not any("resnets" in n for n in trained)
    with pytest.raises(ValueError, match="unet_params='cross_kv' with mode='lora'"):
        FinetuneConfig(mode="lora", unet_params="cross_kv")
    with pytest.raises(ValueError, match="unet_params='some'"):
        FinetuneConfig(unet_params="some")


def test_outside_weight_holds_the_prediction_outside_the_masks_at_the_base_unets(bundle, learned):
    images, state = learned
    unet = _snapshot(bundle.unet)
    cfg = FinetuneConfig(steps=3, mode="full", lr=1e-2, outside_weight=2.0)
    out = finetune(bundle, images, state, cfg, progress=False)
    hist = out.history["finetune"]
    # Step 0 trains the base weights themselves: nothing outside the masks has moved yet.
    assert hist[0]["outside_loss"] < 1e-8 and hist[-1]["outside_loss"] > 1e-6
    assert all(abs(h["loss"] - h["mask_loss"] - cfg.attn_weight * h["attn_loss"] - 2.0 * h["outside_loss"]) < 1e-6
               for h in hist)
    assert _same(bundle.unet, unet)  # the frozen copy and the run left the base as it was
    plain = finetune(bundle, images, state, FinetuneConfig(steps=3, mode="full", lr=1e-2), progress=False)
    assert "outside_loss" not in plain.history["finetune"][0]
    with pytest.raises(ValueError, match="outside_weight=-1"):
        FinetuneConfig(outside_weight=-1)


def test_bf16_mixed_precision_runs_on_the_cpu_and_fp16_falls_back(bundle, learned):
    images, state = learned
    seen = []
    hook = bundle.unet.conv_out.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        out = finetune(bundle, images, state, FinetuneConfig(steps=2, mode="lora", rank=2, mixed_precision="bf16"),
                       progress=False)
        assert seen == [torch.bfloat16] * 2  # the forward ran under the CPU's autocast
        assert out.finetune["status"] == "done"
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.weights.tensors.values())
        seen.clear()
        with pytest.warns(UserWarning, match="fp16 is for CUDA GPUs"):
            finetune(bundle, images, state, FinetuneConfig(steps=1, mode="lora", rank=2, mixed_precision="fp16"),
                     progress=False)
        assert seen == [torch.float32]
    finally:
        hook.remove()


def test_a_steps_gradients_are_freed_before_the_next_step(bundle, learned):
    """A full fine-tune holds one set of gradients, not two (a kept list of them cost 3.6 GB on SD 1.5)."""
    import weakref

    images, state = learned
    grads, hooked, alive_at_forward = [], set(), []

    def keep(p):
        grads.append(weakref.ref(p.grad))

    def at_forward(module, args):  # each step's U-Net call: count the last step's gradients still alive
        alive_at_forward.append(sum(r() is not None for r in grads))
        grads.clear()
        for p in module.parameters():
            if p.requires_grad and id(p) not in hooked:
                p.register_post_accumulate_grad_hook(keep)
                hooked.add(id(p))

    hook = bundle.unet.register_forward_pre_hook(at_forward)
    try:
        finetune(bundle, images, state, FinetuneConfig(steps=3, mode="full"), progress=False)
    finally:
        hook.remove()
    assert len(alive_at_forward) == 3 and grads  # the last step's gradients were seen
    assert alive_at_forward == [0, 0, 0]


def test_finetune_clips_the_gradients_to_a_total_norm_of_one(bundle, learned, monkeypatch):
    """Break-A-Scene's --max_grad_norm 1.0, over everything trained: the weights and the concept vectors."""
    images, state = learned
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *a, **kw):
        params = list(params)
        before = real(params, float("inf"))  # the norm only
        total = real(params, max_norm, *a, **kw)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        calls.append((max_norm, len(params), float(before), float(after), params[0].shape))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    # Gradients a thousand times larger than this tiny model's own (norms of about 0.1), so the clip bites.
    hook = bundle.unet.conv_out.register_full_backward_hook(
        lambda m, gin, gout: tuple(None if g is None else g * 1000.0 for g in gin))
    try:
        out = finetune(bundle, images, state, FinetuneConfig(steps=3, mode="lora", rank=2, lr=1e-2), progress=False)
    finally:
        hook.remove()
    assert FinetuneConfig().max_grad_norm == 1.0 and len(calls) == 3
    n_lora = sum(1 for k in out.weights.tensors)  # every LoRA matrix, plus the vectors
    for max_norm, n, before, after, first in calls:
        assert max_norm == 1.0 and n == n_lora + 1 and first == state.concepts.vectors.shape
        assert after <= 1.0 + 1e-5 and (before <= 1.0 or after == pytest.approx(1.0, rel=1e-4))
    assert all(before > 1.0 for _, _, before, _, _ in calls)  # the clip did something
    assert [h["grad_norm"] for h in out.history["finetune"]] == pytest.approx([c[2] for c in calls], rel=1e-5)
    calls.clear()
    finetune(bundle, images, state, FinetuneConfig(steps=1, mode="lora", rank=2, max_grad_norm=0), progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        FinetuneConfig(max_grad_norm=-1)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_resumed_finetune_restores_its_adamw_moments_and_equals_an_unbroken_one(bundle, learned, tmp_path, mode):
    from em_core.state import load_state

    images, state = learned
    kw = dict(mode=mode, rank=2, lr=1e-2 if mode == "lora" else 1e-3)
    whole = finetune(bundle, images, state, FinetuneConfig(steps=4, **kw), progress=False)
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    part = finetune(bundle, images, state, FinetuneConfig(steps=4, **kw), out=tmp_path / "r", progress=False,
                    should_stop=stop_after_two)
    assert part.finetune["step"] == 2 and part.finetune_optimizer["step"] == 2
    saved = load_state(tmp_path / "r")  # from the files, in a form a new process would get
    assert saved.finetune_optimizer["step"] == 2
    names = set(saved.finetune_optimizer["state"])
    assert "vectors" in names and any(n.startswith("unet.") for n in names) and any(
        n.startswith("text_encoder.") for n in names)
    assert all(s["step"] == 2 for s in saved.finetune_optimizer["state"].values())
    for src in (part, saved):
        resumed = finetune(bundle, images, src, FinetuneConfig(steps=4, **kw), progress=False)
        assert resumed.finetune["step"] == 4
        w, r = whole.weights.tensors, resumed.weights.tensors
        assert set(w) == set(r)
        if mode == "lora":  # the adapters themselves are kept: bit for bit
            assert torch.equal(resumed.concepts.vectors, whole.concepts.vectors)
            assert all(torch.equal(w[k], r[k]) for k in w)
        else:  # the delta goes through base + delta and back, which float32 rounds (measured: 1.9e-6 at
            # most, against 3.6e-3 when AdamW restarts at step 2)
            assert torch.allclose(resumed.concepts.vectors, whole.concepts.vectors, rtol=0, atol=1e-5)
            assert all(torch.allclose(w[k], r[k], rtol=0, atol=1e-5) for k in w)
    # Without the moments (AdamW afresh at step 2) the run differs: the test can tell.
    fresh = finetune(bundle, images, part, FinetuneConfig(steps=4, keep_moments=False, **kw), progress=False)
    assert not torch.equal(fresh.concepts.vectors, whole.concepts.vectors) and fresh.finetune_optimizer is None
    assert state.finetune_optimizer is None and part.finetune_optimizer["step"] == 2  # inputs untouched


def test_the_fp16_loss_scaler_scales_unscales_and_skips_an_overflowing_step(bundle, learned, monkeypatch):
    """fp16 on CUDA gets a GradScaler (a disabled one elsewhere). Run on the CPU with an enabled one: the
    power-of-two scale changes nothing, and a step whose gradients overflow is skipped, not fatal."""
    import importlib

    ft = importlib.import_module("em_core.finetune")  # the package's `finetune` attribute is the function
    images, state = learned
    assert not ft._grad_scaler(bundle, FinetuneConfig(mixed_precision="fp16")).is_enabled()  # the CPU: none
    cfg = FinetuneConfig(steps=3, mode="lora", rank=2, lr=1e-2)
    plain = finetune(bundle, images, state, cfg, progress=False)
    monkeypatch.setattr(ft, "_grad_scaler", lambda b, c: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    scaled = finetune(bundle, images, state, cfg, progress=False)
    assert torch.equal(scaled.concepts.vectors, plain.concepts.vectors)
    assert all(torch.equal(scaled.weights.tensors[k], v) for k, v in plain.weights.tensors.items())
    assert scaled.finetune["scaler"]["scale"] == 2.0 ** 10
    seen = {"n": 0}

    def overflow_second_step(module, grad_in, grad_out):
        seen["n"] += 1
        if seen["n"] == 2:
            return tuple(None if g is None else torch.full_like(g, float("inf")) for g in grad_in)

    hook = bundle.unet.conv_out.register_full_backward_hook(overflow_second_step)
    try:
        skipped = finetune(bundle, images, state, cfg, progress=False)
    finally:
        hook.remove()
    hist = skipped.history["finetune"]
    assert skipped.finetune["status"] == "done" and [h.get("skipped", False) for h in hist] == [False, True, False]
    assert skipped.finetune["scaler"]["scale"] == 2.0 ** 9  # backed off once
    moments = skipped.finetune_optimizer["state"]
    assert all(s["step"] == 2 for s in moments.values())  # AdamW stepped twice in three steps
