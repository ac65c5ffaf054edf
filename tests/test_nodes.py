"""The ComfyUI nodes, run in plain Python on the tiny model (CI has no ComfyUI)."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import nodes as pack
from nodes import host
from nodes.convert import pil_to_images
from nodes.learn_nodes import AttentionMaskInit, DenseCRFRefine, EMTokenStep, JointFinetune, parse_init_words
from nodes.output_nodes import (ConceptGenerate, ExportConceptsForComfy, LoadConcepts, MaskOverlayPreview,
                                SaveConcepts, to_embedding_prompt)


def test_every_node_declares_the_classic_api():
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert isinstance(spec["required"], dict), name
        for section in ("required", "optional"):
            for inp, decl in spec.get(section, {}).items():
                assert isinstance(decl, tuple) and decl, (name, inp)
                assert isinstance(decl[0], (str, list)), (name, inp)
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION)), name
        assert cls.CATEGORY == "concept_em"
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), name


def test_the_concept_file_nodes_are_called_concepts_and_keep_their_type_names():
    """'Bundle' is the base model's parts (ModelBundle); the concept file's nodes say 'Concepts'
    in every title, description and tooltip, and keep the type names (and the Load node its
    'bundle' input) that saved workflows refer to."""
    titles = pack.NODE_DISPLAY_NAME_MAPPINGS
    assert titles["ConceptEM_SaveBundle"] == "Save Concepts" and titles["ConceptEM_LoadBundle"] == "Load Concepts"
    assert pack.NODE_CLASS_MAPPINGS["ConceptEM_SaveBundle"] is SaveConcepts
    assert pack.NODE_CLASS_MAPPINGS["ConceptEM_LoadBundle"] is LoadConcepts
    assert "bundle" in LoadConcepts.INPUT_TYPES()["required"]
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        texts = [titles[name], getattr(cls, "DESCRIPTION", "")]
        for section in cls.INPUT_TYPES().values():
            texts += [decl[1].get("tooltip", "") for decl in section.values() if isinstance(decl, tuple) and
                      len(decl) > 1 and isinstance(decl[1], dict)]
        texts += list(getattr(cls, "OUTPUT_TOOLTIPS", ()))
        assert not [t for t in texts if "bundle" in t.lower()], name


@pytest.fixture
def started(node_start):
    return node_start


def test_mask_init_then_crf_then_em_steps_then_finetune(bundle, images, started):
    run, masks = started
    assert masks.shape == (5, 64, 64)  # 3 concepts on image 1, 2 on image 2
    assert run.state.concepts.names == ["[v1]", "[v2]", "[v3]"] and run.state.step == 0
    refined, rmasks = DenseCRFRefine().run(10, 3.0, 7.0, 50.0, 5.0, 10.0, concepts=run)
    assert rmasks.shape == masks.shape and refined.state.history["refreshes"][-1]["kind"] == "crf"
    before = run.state.concepts.vectors.clone()
    a, amasks, curve = EMTokenStep().run(bundle, refined, 3, 5e-4, 1e-2, 2, True, 4, True)
    b, _, _ = EMTokenStep().run(bundle, a, 2, 1e-4, 1e-2, 0, False, 4, False)  # a second stage, chained
    assert a.state.step == 3 and b.state.step == 5 and b.state.config.lr == 1e-4
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert torch.equal(run.state.concepts.vectors, before) and refined.state.step == 0  # inputs untouched
    tuned, _ = JointFinetune().run(bundle, b, 2, 0.0, "lora", 2, True, False)
    assert tuned.state.weights.kind == "lora" and b.state.weights is None
    img, = ConceptGenerate().run(bundle, tuned, "[v1] next to a robot", "", 1, 3, 5.0, 64, 64, 2, "ddim")
    assert img.shape == (2, 64, 64, 3) and 0 <= float(img.min()) and float(img.max()) <= 1


@pytest.fixture
def resume_root(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "resume_root", lambda: tmp_path / "resume")
    return tmp_path / "resume"


def _stop_after(n):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > n

    return stop


def test_cancel_raises_keeps_a_checkpoint_and_a_requeue_resumes_it(bundle, started, resume_root, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "concept_em")  # ComfyUI's log shows INFO
    run, _ = started
    whole, _, _ = EMTokenStep().run(bundle, run, 4, 5e-4, 1e-2, 2, True, 4, True)
    assert not list(resume_root.iterdir())  # a finished run leaves no checkpoint
    monkeypatch.setattr(host, "interrupted", _stop_after(3))
    # Cancelled: the node raises (ComfyUI's interruption in ComfyUI), so nothing is cached as done.
    with pytest.raises(host.Cancelled):
        EMTokenStep().run(bundle, run, 4, 5e-4, 1e-2, 2, True, 4, True)
    assert len(list(resume_root.iterdir())) == 1
    monkeypatch.setattr(host, "interrupted", lambda: False)
    again, _, _ = EMTokenStep().run(bundle, run, 4, 5e-4, 1e-2, 2, True, 4, True)
    assert "resuming from step 3 of 4" in caplog.text
    caplog.clear()
    assert again.state.step == 4 and again.state.status == "done"
    assert torch.equal(again.state.concepts.vectors, whole.state.concepts.vectors)
    assert all(np.array_equal(a, b) for a, b in zip(again.state.masks, whole.state.masks))
    assert not list(resume_root.iterdir())
    # Other settings are another run: the checkpoint of one never feeds the other.
    monkeypatch.setattr(host, "interrupted", _stop_after(2))
    with pytest.raises(host.Cancelled):
        EMTokenStep().run(bundle, run, 4, 5e-4, 1e-2, 2, True, 4, True)
    monkeypatch.setattr(host, "interrupted", lambda: False)
    other, _, _ = EMTokenStep().run(bundle, run, 4, 1e-4, 1e-2, 2, True, 4, True)
    assert "resuming" not in caplog.text and other.state.step == 4


def test_a_cancelled_fine_tune_resumes_from_its_checkpoint(bundle, started, resume_root, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "concept_em")
    run, _ = started
    whole, _ = JointFinetune().run(bundle, run, 3, 1e-3, "lora", 2, True, False)
    monkeypatch.setattr(host, "interrupted", _stop_after(2))
    with pytest.raises(host.Cancelled):
        JointFinetune().run(bundle, run, 3, 1e-3, "lora", 2, True, False)
    monkeypatch.setattr(host, "interrupted", lambda: False)
    again, _ = JointFinetune().run(bundle, run, 3, 1e-3, "lora", 2, True, False)
    assert "resuming from step 2 of 3" in caplog.text
    assert again.state.finetune["step"] == 3 and again.state.finetune["status"] == "done"
    assert torch.allclose(again.state.concepts.vectors, whole.state.concepts.vectors, atol=1e-6)


def test_bad_inputs(bundle, images, started):
    with pytest.raises(ValueError, match="names no concept"):
        AttentionMaskInit().run(bundle, images, "a photo of a dog", "", 4, 0.5, 0, 0, 0)
    with pytest.raises(ValueError, match="2 image\\(s\\) but 3 prompt\\(s\\)"):
        AttentionMaskInit().run(bundle, images, "[v1]\n[v2]\n[v3]", "", 4, 0.5, 0, 0, 0)
    with pytest.raises(ValueError, match="init words"):
        parse_init_words("[v1] man")
    with pytest.raises(ValueError, match="differs from the image"):
        DenseCRFRefine().run(10, 3.0, 7.0, 50.0, 5.0, 10.0, image=images[:1], mask=torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="connect either concepts"):
        DenseCRFRefine().run(10, 3.0, 7.0, 50.0, 5.0, 10.0)
    with pytest.raises(ValueError, match="which these concepts lack"):
        ConceptGenerate().run(bundle, started[0], "[v9] here", "", 1, 2, 5.0, 64, 64, 1, "ddim")


def test_crf_node_on_any_image_and_mask(images, scene_files):
    truth = torch.from_numpy(np.stack([scene_files[0][1]["[v1]"], scene_files[0][1]["[v2]"]]).astype(np.float32))
    _, refined = DenseCRFRefine().run(10, 3.0, 7.0, 50.0, 5.0, 10.0, image=images[:1], mask=truth)
    assert refined.shape == (2, 64, 64)
    inter = ((refined > 0.5) & (truth > 0.5)).sum() / ((refined > 0.5) | (truth > 0.5)).sum()
    assert inter > 0.8  # exact masks of flat shapes stay where they are


def test_crf_node_presets(images, scene_files, monkeypatch):
    """CutLER's settings by default; 'deeplab' gives the old set; the six values count only under 'custom'."""
    import nodes.learn_nodes as ln
    from em_core.crf import PRESETS, CRFParams

    seen = []
    monkeypatch.setattr(ln, "refine_masks", lambda img, m, params, *a: (seen.append(params), m)[1])
    truth = torch.from_numpy(scene_files[0][1]["[v1]"][None].astype(np.float32))
    spec = DenseCRFRefine.INPUT_TYPES()["required"]
    defaults = {k: spec[k][1]["default"] for k in PRESETS["cutler"]}
    assert defaults == PRESETS["cutler"] and spec["preset"][1]["default"] == "cutler"
    DenseCRFRefine().run(10, 1.0, 1.0, 1.0, 1.0, 1.0, 128, image=images[:1], mask=truth)
    DenseCRFRefine().run(10, 1.0, 1.0, 1.0, 1.0, 1.0, 0, "deeplab", image=images[:1], mask=truth)
    DenseCRFRefine().run(5, 2.0, 2.0, 2.0, 2.0, 2.0, 64, "custom", image=images[:1], mask=truth)
    assert seen[0] == CRFParams(max_side=128)
    assert seen[1] == CRFParams.preset("deeplab", max_side=None)
    assert seen[2] == CRFParams(5, 2.0, 2.0, 2.0, 2.0, 2.0, max_side=64)


def test_save_load_export_overlay(bundle, started, tmp_path, monkeypatch, tiny_dir):
    run, masks = started
    roots = {"concepts": tmp_path / "concepts", "embeddings": tmp_path / "emb", "loras": tmp_path / "loras"}
    monkeypatch.setattr(host, "folder", lambda kind, fallback: roots[kind])
    monkeypatch.setattr(host, "list_files", lambda kind, fallback: sorted(p.name for p in roots[kind].glob("*")))
    for bad in ["../x", "a/b", ".."]:
        with pytest.raises(ValueError, match="not allowed"):
            SaveConcepts().run(bundle, run, bad)
    assert not any(tmp_path.rglob("*.safetensors"))
    SaveConcepts().run(bundle, run, "trio")
    assert (roots["concepts"] / "trio_00001_.safetensors").is_file()  # numbered, as core SaveImage
    assert LoadConcepts.INPUT_TYPES()["required"]["bundle"][0] == ["trio_00001_.safetensors"]
    loaded, = LoadConcepts().run(bundle, "trio_00001_.safetensors", False)
    assert loaded.state.concepts.names == run.state.concepts.names and loaded.images == ()
    with pytest.raises(ValueError, match="without its images"):
        EMTokenStep().run(bundle, loaded, 1, 5e-4, 1e-2, 0, True, 4, True)
    from em_core.tiny_world.tiny_model import build_model

    with pytest.raises(ValueError, match="another base model"):
        LoadConcepts().run(build_model("tiny", seed=9), "trio_00001_.safetensors", False)
    with pytest.raises(ValueError, match="resolves outside"):
        LoadConcepts().run(bundle, "../trio.safetensors", False)
    hint = ExportConceptsForComfy().run(run, "trio", 4)["result"][0]
    assert "[v1] -> embedding:trio_v1" in hint and (roots["embeddings"] / "trio_v2.safetensors").is_file()
    img = pil_to_images([Image.new("RGB", (64, 64), (0, 0, 0))])
    out, = MaskOverlayPreview().run(img, masks[:3], 0.5)
    assert out.shape == (1, 64, 64, 3) and float(out.max()) > 0


def test_concept_text_for_comfy_tokenizer():
    assert to_embedding_prompt("[v1] shaking hands with [v3]", "fam", ["[v1]", "[v3]"]) == \
        "embedding:fam_v1  shaking hands with  embedding:fam_v3"
    with pytest.raises(ValueError, match="lack"):
        to_embedding_prompt("[v2]", "fam", ["[v1]"])


@pytest.mark.slow
def test_bridge_from_comfyui_layout_state_dicts_of_an_sd15_shaped_model(sd15_model):
    """What Load Checkpoint gives, faked with the layouts ComfyUI uses (MODEL: LDM names; CLIP:
    clip_l.transformer.* Hugging Face names; VAE: LDM names)."""
    from types import SimpleNamespace

    from em_core.model_io.ldm_layout import unet_to_ldm, vae_to_ldm
    from nodes.model_nodes import ConceptModelFromCheckpoint

    ref = sd15_model
    unet = {k[len("model.diffusion_model."):]: v for k, v in unet_to_ldm(ref.unet.state_dict(),
                                                                      ref.unet.config).items()}
    vae = {k[len("first_stage_model."):]: v for k, v in vae_to_ldm(ref.vae.state_dict(), ref.vae.config).items()}
    # ComfyUI's names keep text_model.; transformers' own state dict has it up to some 5.x release, not after.
    clip = {"clip_l.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in ref.text_encoder.state_dict().items()}

    class _SD(torch.nn.Module):
        def __init__(self, sd):
            super().__init__()
            self.sd = sd

        def state_dict(self, *a, **k):
            return dict(self.sd)

    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=_SD(unet),
                                                  model_type=SimpleNamespace(name="EPS")))
    em, = ConceptModelFromCheckpoint().run(model, SimpleNamespace(cond_stage_model=_SD(clip)),
                                          SimpleNamespace(first_stage_model=_SD(vae)))
    for a, b in ((em.unet, ref.unet), (em.vae, ref.vae), (em.text_encoder, ref.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)
    assert em.scheduler.config.prediction_type == "epsilon" and len(em.tokenizer) == 49408
    v_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=_SD(unet),
                                                    model_type=SimpleNamespace(name="FLOW")))
    with pytest.raises(ValueError, match="not supported"):
        ConceptModelFromCheckpoint().run(v_model, SimpleNamespace(cond_stage_model=_SD(clip)),
                                         SimpleNamespace(first_stage_model=_SD(vae)))


def test_nodes_learn_under_comfyuis_inference_mode(tiny_dir, images):
    """ComfyUI calls every node inside torch.inference_mode(); learning must still work."""
    from nodes.model_nodes import ConceptModelLoader

    with torch.inference_mode():
        loader = ConceptModelLoader()
        import nodes.model_nodes as mn

        old = mn.SHIPPED_DIR
        mn.SHIPPED_DIR = tiny_dir
        try:
            em, = loader.run(mn.SHIPPED)
        finally:
            mn.SHIPPED_DIR = old
        run, _ = AttentionMaskInit().run(em, images, "[v1] and [v2] on [v3]", "[v1]=red", 2, 0.5, 0, 1, 0)
        a, _, _ = EMTokenStep().run(em, run, 2, 5e-4, 1e-2, 1, True, 2, True)
        b, _ = JointFinetune().run(em, a, 1, 0.0, "full", 2, True, False)
        img, = ConceptGenerate().run(em, b, "[v1]", "", 0, 2, 3.0, 64, 64, 1, "ddim")
    assert a.state.step == 2 and b.state.finetune["step"] == 1 and img.shape == (1, 64, 64, 3)
