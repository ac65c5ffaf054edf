"""Memory, devices and precision through ComfyUI's model management, faked (CI has no ComfyUI):
issue 16, part 4. The nodes take ComfyUI's device, make room before they put the engine's model on
it or train, empty torch's cache after, keep the precision the user loaded, and check the fine-tune's
mixed precision before use."""
import types

import pytest
import torch
from PIL import Image

import nodes.learn_nodes as ln
import nodes.model_nodes as mn
from nodes import host
from nodes.convert import pil_to_images
from nodes.learn_nodes import AttentionMaskInit, EMTokenStep, JointFinetune, mixed_precision_for


class FakeMM:
    """comfy.model_management as the nodes use it, recording the calls in order."""

    class InterruptProcessingException(Exception):
        pass

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.log = []

    def get_torch_device(self):
        return self.device

    def free_memory(self, memory_required, device, keep_loaded=()):
        self.log.append(("free_memory", memory_required, device))

    def unload_all_models(self):
        self.log.append("unload_all_models")

    def soft_empty_cache(self, force=False):
        self.log.append("soft_empty_cache")

    def processing_interrupted(self):
        return False


@pytest.fixture
def mm(monkeypatch, tmp_path):
    fake = FakeMM()
    monkeypatch.setattr(host, "_mm", fake)
    monkeypatch.setattr(host, "resume_root", lambda: tmp_path / "resume")
    return fake


@pytest.fixture
def images(scene_files):
    return pil_to_images([Image.open(p) for p, _ in scene_files])


def test_plain_python_fallbacks(monkeypatch):
    monkeypatch.setattr(host, "_mm", None)
    want = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert host.torch_device() == want
    host.free_memory(1e9, want)  # nothing to unload outside ComfyUI: no error
    host.unload_all_models()
    host.soft_empty_cache()


def test_comfyuis_device_and_calls(mm):
    assert host.torch_device() == torch.device("cpu")
    host.free_memory(123, mm.device)
    host.unload_all_models()
    host.soft_empty_cache()
    assert mm.log == [("free_memory", 123, mm.device), "unload_all_models", "soft_empty_cache"]


class _SD(torch.nn.Module):
    """A ComfyUI module whose state_dict() the checkpoint node reads (and logs when it does)."""

    def __init__(self, sd, log, name):
        super().__init__()
        self.sd, self.log, self.name = sd, log, name

    def state_dict(self, *a, **k):
        self.log.append(f"state_dict:{self.name}")
        return dict(self.sd)


def _comfy_objects(log, unet_dtype=torch.float16, kind="EPS", manual_cast=None):
    unet = {"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3, dtype=unet_dtype),
            "out.2.bias": torch.zeros(4, dtype=unet_dtype)}
    model = types.SimpleNamespace(model=types.SimpleNamespace(
        diffusion_model=_SD(unet, log, "unet"), model_type=types.SimpleNamespace(name=kind),
        manual_cast_dtype=manual_cast))
    clip = types.SimpleNamespace(cond_stage_model=_SD({"clip_l.transformer.x": torch.zeros(10)}, log, "clip"))
    vae = types.SimpleNamespace(first_stage_model=_SD({"decoder.conv_in.weight": torch.zeros(6)}, log, "vae"))
    return model, clip, vae


def test_checkpoint_node_makes_room_before_it_copies_and_empties_the_cache_after(mm, bundle, monkeypatch):
    calls = []

    def fake_bridge(unet, text, vae, prediction, source, dtype):
        mm.log.append("bridge")
        calls.append((prediction, dtype))
        return bundle

    monkeypatch.setattr(mn, "bundle_from_comfy", fake_bridge)
    model, clip, vae = _comfy_objects(mm.log, unet_dtype=torch.float32)
    em, = mn.ConceptModelFromCheckpoint().run(model, clip, vae)
    assert em is bundle and calls == [("epsilon", torch.float32)]
    free = [i for i, c in enumerate(mm.log) if isinstance(c, tuple) and c[0] == "free_memory"]
    assert len(free) == 1
    _, needed, device = mm.log[free[0]]
    assert device == torch.device("cpu") and needed == (320 * 4 * 9 + 4 + 10 + 6) * 4  # float32 bytes
    # The tensors it copies are taken after ComfyUI made room (so none pins ComfyUI's GPU copy), and
    # torch's cache is emptied once the copy is on the device.
    after = mm.log[free[0] + 1:]
    assert after[:3] == ["state_dict:unet", "state_dict:clip", "state_dict:vae"]
    assert after.index("bridge") > 2 and after[-1] == "soft_empty_cache"


def test_checkpoint_node_prediction_type_from_comfyui_or_the_input(mm, bundle, monkeypatch):
    seen = []
    monkeypatch.setattr(mn, "bundle_from_comfy", lambda u, t, v, prediction, source, dtype: seen.append(prediction)
                        or bundle)
    node = mn.ConceptModelFromCheckpoint()
    node.run(*_comfy_objects(mm.log, kind="V_PREDICTION"))  # ComfyUI's ModelType.V_PREDICTION
    node.run(*_comfy_objects(mm.log, kind="EPS"))
    node.run(*_comfy_objects(mm.log, kind="V_PREDICTION"), prediction_type="epsilon")  # ComfyUI guessed wrong
    node.run(*_comfy_objects(mm.log, kind="EPS"), prediction_type="v_prediction")
    assert seen == ["v_prediction", "epsilon", "epsilon", "v_prediction"]
    assert mn.ConceptModelFromCheckpoint.INPUT_TYPES()["required"]["prediction_type"][0] == mn.PREDICTIONS
    assert list(mn.ConceptModelFromCheckpoint.INPUT_TYPES()["required"])[-1] == "prediction_type"  # last


def test_the_precision_the_user_loaded_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    log = []
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    half, _, _ = _comfy_objects(log, unet_dtype=torch.float16)
    unet16 = half.model.diffusion_model.sd
    assert mn.loaded_dtype(half, unet16, cuda) == torch.float16
    assert mn.loaded_dtype(half, unet16, cpu) == torch.float32  # as ComfyUI's --cpu runs
    bf, _, _ = _comfy_objects(log, unet_dtype=torch.bfloat16)
    assert mn.loaded_dtype(bf, bf.model.diffusion_model.sd, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert mn.loaded_dtype(bf, bf.model.diffusion_model.sd, cuda) == torch.float16
    # fp8 storage: ComfyUI computes in its manual cast dtype, and so does the copy; without one, float32.
    f8, _, _ = _comfy_objects(log, unet_dtype=torch.float8_e4m3fn, manual_cast=torch.float16)
    assert mn.loaded_dtype(f8, f8.model.diffusion_model.sd, cuda) == torch.float16
    f8.model.manual_cast_dtype = None
    assert mn.loaded_dtype(f8, f8.model.diffusion_model.sd, cuda) == torch.float32


def test_bridged_modules_are_built_in_the_loaded_dtype(monkeypatch):
    """The engine's modules hold the dtype they are given, with the weights' values (checked with the
    tiny model's sizes: an SD model's would take minutes here)."""
    import em_core.model_io.single_file as sf
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from em_core.tiny_world.tiny_model import SD_SCHEDULER, TINY

    text_cfg = dict(TINY["text"], vocab_size=49408, max_position_embeddings=77)
    cfg = {"unet": TINY["unet"], "vae": TINY["vae"], "text": text_cfg, "scheduler": SD_SCHEDULER,
           "pad_token": "<|endoftext|>"}
    monkeypatch.setattr(sf, "family_config", lambda family, prediction: cfg)
    torch.manual_seed(0)
    ref = (UNet2DConditionModel(**TINY["unet"]), AutoencoderKL(**TINY["vae"]), CLIPTextModel(CLIPTextConfig(**text_cfg)))
    states = [m.state_dict() for m in ref]
    b = sf._assemble("sd15", lambda c: dict(states[0]), lambda c: dict(states[1]), lambda m: dict(states[2]),
                     "epsilon", "test", torch.float16)
    for ours, want in zip((b.unet, b.vae, b.text_encoder), states):
        got = ours.state_dict()
        assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k].half())
                   for k in want if want[k].is_floating_point())


def test_learning_nodes_unload_comfyuis_models_first_and_empty_the_cache_after(mm, bundle, images):
    run, _ = AttentionMaskInit().run(bundle, images, "[v1] and [v2] on [v3]", "[v1]=red", 2, 0.5, 0, 0, 0)
    assert mm.log == ["unload_all_models", "soft_empty_cache"]
    mm.log.clear()
    a, _, _ = EMTokenStep().run(bundle, run, 2, 5e-4, 1e-2, 1, False, 2, True)
    assert mm.log == ["unload_all_models", "soft_empty_cache"]
    mm.log.clear()
    b, _ = JointFinetune().run(bundle, a, 1, 0.0, "lora", 2, True, False, "fp32")
    assert mm.log == ["unload_all_models", "soft_empty_cache"]
    assert b.state.finetune["config"]["mixed_precision"] == "no"
    # A refused setting still empties the cache, and names the input.
    mm.log.clear()
    with pytest.raises(ValueError, match="mixed_precision: fp16 runs on CUDA GPUs only"):
        JointFinetune().run(bundle, a, 1, 0.0, "lora", 2, True, False, "fp16")
    assert mm.log == ["unload_all_models", "soft_empty_cache"]


def test_mixed_precision_is_checked_before_use(monkeypatch):
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert mixed_precision_for("auto", cuda) == "bf16"
    assert mixed_precision_for("bf16", cuda) == "bf16"
    assert mixed_precision_for("fp16", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert mixed_precision_for("auto", cuda) == "fp16"  # the GPU has no bf16: fp16, not a failure
    with pytest.raises(ValueError, match=r"mixed_precision: this GPU \(Tesla T4\) does not support bf16"):
        mixed_precision_for("bf16", cuda)
    assert mixed_precision_for("auto", cpu) == "no" and mixed_precision_for("fp32", cuda) == "no"
    assert mixed_precision_for("bf16", cpu) == "bf16"  # the engine's CPU autocast
    with pytest.raises(ValueError, match="mixed_precision: fp16 runs on CUDA GPUs only"):
        mixed_precision_for("fp16", cpu)
    with pytest.raises(ValueError, match="mixed_precision: bf16 runs on CUDA GPUs"):
        mixed_precision_for("bf16", mps)
    with pytest.raises(ValueError, match="not one of"):
        mixed_precision_for("fp8", cuda)
    spec = JointFinetune.INPUT_TYPES()["required"]
    assert spec["mixed_precision"][0] == ["auto", "fp32", "fp16", "bf16"]
    assert list(spec)[-1] == "mixed_precision"  # last: older workflows keep their widget values in place


def _params(bundle):
    return {f"{n}.{k}": v.detach().clone() for n, m in (("unet", bundle.unet), ("text", bundle.text_encoder))
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_half_precision_model_is_fine_tuned_and_given_back_unchanged(mm, bundle, images, monkeypatch, mode):
    run, _ = AttentionMaskInit().run(bundle, images, "[v1] and [v2] on [v3]", "[v1]=red", 2, 0.5, 0, 0, 0)
    bundle.to(dtype=torch.bfloat16)
    before = _params(bundle)
    seen = []
    real = ln.finetune

    def spy(em_model, *a, **k):
        seen.append((em_model.unet.dtype, em_model.text_encoder.dtype))
        return real(em_model, *a, **k)

    monkeypatch.setattr(ln, "finetune", spy)
    tuned, _ = JointFinetune().run(bundle, run, 1, 0.0, mode, 2, True, False, "fp32")
    # Both modes train on the model as loaded (lifting it to float32 would double its memory): LoRA
    # adapters are kept in float32 by the engine, a full run trains float32 copies.
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert tuned.state.weights.kind == mode
    assert all(t.dtype == torch.float32 for t in tuned.state.weights.tensors.values())
    if mode == "lora":  # the step trained the adapters (peft starts lora_B at zero)
        assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in tuned.state.weights.tensors.items())
    after = _params(bundle)
    assert bundle.unet.dtype == torch.bfloat16 and bundle.text_encoder.dtype == torch.bfloat16
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
