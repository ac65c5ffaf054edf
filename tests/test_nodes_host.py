"""The nodes inside a ComfyUI host, faked (CI has no ComfyUI): how the pack is imported, the model
folders it lists, the files it writes, and whom its live messages reach (issue 16, parts 2, 7, 8, 9)."""
import json
import logging
import os
import stat
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nodes.model_nodes as mn
from nodes import host, live
from nodes.convert import pil_to_images
from nodes.learn_nodes import AttentionMaskInit, DenseCRFRefine, EMTokenStep, JointFinetune
from nodes.output_nodes import LoadConcepts, SaveConcepts

PACK = Path(__file__).resolve().parents[1]

# What ComfyUI's load_custom_node does with a folder in custom_nodes (nodes.py, a125cd84): imports
# its __init__.py under a name made from the folder's path, after ComfyUI's own `nodes` is imported.
LOAD_LIKE_COMFYUI = r"""
import importlib.machinery, importlib.util, json, os, sys
pack = sys.argv[1]
import nodes as comfy_nodes
before = list(sys.path)
name = pack.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
found = {}
for m in ("nodes", "tools", "tests", "benchmarks"):
    s = importlib.machinery.PathFinder.find_spec(m)  # what a later `import m` would find on sys.path
    found[m] = None if s is None else (s.origin or list(s.submodule_search_locations or []))
print(json.dumps({"path_same": sys.path == before, "found": found, "n": len(module.NODE_CLASS_MAPPINGS),
                  "engine": sys.modules["em_core"].__file__, "nodes_is_comfy": sys.modules["nodes"] is comfy_nodes,
                  "comfy_nodes": getattr(comfy_nodes, "IS_COMFY", False)}))
"""


def test_the_pack_imports_as_comfyui_loads_it_without_shadowing_anything(tmp_path):
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    (comfy / "nodes.py").write_text("IS_COMFY = True\n")
    (tmp_path / "load.py").write_text(LOAD_LIKE_COMFYUI)
    env = {**os.environ, "PYTHONPATH": str(comfy)}
    out = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(PACK)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == 14 and got["nodes_is_comfy"] and got["comfy_nodes"]
    assert got["path_same"], "the pack changed sys.path"
    for name, where in got["found"].items():  # nothing of the pack's is found by a plain import
        assert where is None or str(PACK) not in str(where), (name, where)
    assert Path(got["engine"]).resolve().parent == PACK / "em_core"


def test_a_different_em_core_already_loaded_is_refused(monkeypatch):
    from nodes import _engine

    monkeypatch.setitem(sys.modules, "em_core", types.SimpleNamespace(__file__="/elsewhere/em_core/__init__.py"))
    with pytest.raises(ImportError, match="needs its own"):
        _engine.load_engine()


def fake_folder_paths(monkeypatch, paths: dict):
    """folder_paths as ComfyUI has it: `diffusers` is registered with the extension "folder", so
    get_filename_list finds no model folder in it."""
    fp = types.SimpleNamespace(get_folder_paths=lambda kind: [str(p) for p in paths[kind]],
                               get_filename_list=lambda kind: [])
    monkeypatch.setattr(host, "_fp", fp)


def model_folder(path: Path) -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text("{}")
    (path / "model_index.json").write_text("{}")
    return path


def test_model_loader_lists_every_diffusers_folder_and_finds_it_again(tmp_path, monkeypatch):
    a, b = tmp_path / "models" / "diffusers", tmp_path / "extra" / "diffusers"
    model_folder(a / "sd15")
    model_folder(a / "stability" / "sd21-base")
    (a / "loose").mkdir()  # no model_index.json
    model_folder(b / "other")
    model_folder(b / "sd15")  # the same name in a later path: the first one wins
    fake_folder_paths(monkeypatch, {"diffusers": [a, b, tmp_path / "missing"]})
    choices = mn.ConceptModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == [mn.SHIPPED, "other", "sd15", "stability/sd21-base"]
    loaded = []

    class Loaded:  # what load_bundle gives, as far as the loader uses it (sized, then moved to the device)
        unet = vae = text_encoder = torch.nn.Linear(1, 1)
        text_encoders = (text_encoder,)  # SDXL's bundles have two

        def to(self, device=None):
            return self

    bundle = Loaded()
    monkeypatch.setattr(mn, "load_bundle", lambda path, device=None: loaded.append(Path(path)) or bundle)
    for name in choices[1:]:
        assert mn.ConceptModelLoader().run(name) == (bundle,)
    assert loaded == [b / "other", a / "sd15", a / "stability" / "sd21-base"]
    with pytest.raises(ValueError, match="outside"):
        mn.ConceptModelLoader().run("../models/diffusers/sd15")
    with pytest.raises(FileNotFoundError, match="loose"):
        mn.ConceptModelLoader().run("loose")


def test_model_loader_outside_comfyui_lists_the_fallback_folder(tmp_path, monkeypatch):
    model_folder(tmp_path / "one")
    monkeypatch.setattr(mn, "DIFFUSERS_FALLBACK", tmp_path)
    assert mn.ConceptModelLoader.INPUT_TYPES()["required"]["model_name"][0] == [mn.SHIPPED, "one"]


@pytest.fixture
def started(node_start):
    return node_start[0]


def test_save_concepts_numbers_its_files_and_overwrites_only_when_told(bundle, started, tmp_path, monkeypatch):
    root = tmp_path / "concepts"
    monkeypatch.setattr(host, "folder", lambda kind, fallback: root)
    monkeypatch.setattr(host, "list_files", lambda kind, fallback: sorted(p.name for p in root.glob("*")))
    old = os.umask(0o022)
    try:
        SaveConcepts().run(bundle, started, "trio", False)
        SaveConcepts().run(bundle, started, "trio", False)
        SaveConcepts().run(bundle, started, "trio_b", False)  # its own numbers, not trio's
        (root / "trio_00007_.safetensors").write_bytes((root / "trio_00001_.safetensors").read_bytes())
        out = SaveConcepts().run(bundle, started, "trio", False)
        assert out["ui"]["text"] == [str(root / "trio_00008_.safetensors")]
        first = (root / "trio_00001_.safetensors").read_bytes()
        SaveConcepts().run(bundle, started, "trio", True)
        SaveConcepts().run(bundle, started, "trio", True)
    finally:
        os.umask(old)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["trio.safetensors", "trio_00001_.safetensors", "trio_00002_.safetensors",
                     "trio_00007_.safetensors", "trio_00008_.safetensors", "trio_b_00001_.safetensors"]
    assert (root / "trio_00001_.safetensors").read_bytes() == first  # never replaced
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in root.iterdir())
    assert LoadConcepts.INPUT_TYPES()["required"]["bundle"][0] == names
    loaded, = LoadConcepts().run(bundle, "trio_00002_.safetensors", False)
    assert loaded.state.concepts.names == started.state.concepts.names
    spec = SaveConcepts.INPUT_TYPES()["required"]
    assert list(spec)[-1] == "overwrite" and spec["overwrite"][1]["default"] is False


class FakeServer:
    """ComfyUI's PromptServer as the nodes see it: client_id is the id of the browser that queued
    the running prompt (None for a prompt queued without one); send_sync(event, data, sid)."""

    def __init__(self, client_id):
        self.client_id = client_id
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def server(monkeypatch):
    def install(client_id):
        srv = FakeServer(client_id)
        module = types.ModuleType("server")
        module.PromptServer = types.SimpleNamespace(instance=srv)
        monkeypatch.setitem(sys.modules, "server", module)
        return srv

    return install


def test_live_messages_reach_only_the_client_that_queued_the_prompt(bundle, started, server):
    srv = server("browser-1")
    EMTokenStep().run(bundle, started, 3, 5e-4, 1e-2, 0, True, 4, True, unique_id="7")
    progress = [m for m in srv.sent if m[0] == live.EVENT]
    assert progress and all(sid == "browser-1" for _, _, sid in srv.sent)
    assert progress[-1][1]["node"] == "7" and progress[-1][1]["step"] == 3
    quiet = server(None)  # queued through the API without a client id: no one is sent anything
    EMTokenStep().run(bundle, started, 2, 5e-4, 1e-2, 0, True, 4, True, unique_id="7")
    assert quiet.sent == []


def test_a_concept_densecrf_removes_is_reported_to_the_ui(server):
    srv = server("browser-2")
    img = pil_to_images([Image.fromarray(np.full((16, 16, 3), 128, np.uint8))])
    masks = torch.zeros(2, 16, 16)
    masks[0] = 1
    masks[1, 6:9, 6:9] = 1
    with pytest.warns(UserWarning, match="removed"):  # still on the console, as before
        _, refined = DenseCRFRefine().run(10, 1.0, 3.0, 67.0, 3.0, 4.0, image=img, mask=masks)
    assert refined[1].any()
    sent = [(data, sid) for event, data, sid in srv.sent if event == live.WARNING_EVENT]
    assert len(sent) == 1 and sent[0][1] == "browser-2"
    assert sent[0][0]["class"] == "DenseCRFRefine" and "removed mask 1" in sent[0][0]["messages"][0]


def test_an_empty_mask_fallback_is_reported_with_the_running_node(bundle, images, server, monkeypatch):
    import em_core.masks

    srv = server("browser-3")
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: types.SimpleNamespace(node_id="12", prompt_id="p")
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    monkeypatch.setattr(em_core.masks, "normalise", lambda maps: torch.zeros_like(maps))  # every mask empty
    with pytest.warns(UserWarning, match="is empty"):
        AttentionMaskInit().run(bundle, images[:1], "[v1] and [v2]", "", 2, 0.5, 0, 0, 0)
    (event, data, sid), = srv.sent
    assert event == live.WARNING_EVENT and sid == "browser-3" and data["node"] == "12"
    assert [m.split(" is empty")[0] for m in data["messages"]] == ["mask of [v1]", "mask of [v2]"]


def test_forwarded_warnings_join_a_text_output_and_library_warnings_stay_on_the_console(server):
    srv = server("browser-4")

    class Node:
        @live.forward_warnings
        def run(self, unique_id=None):
            warnings.warn("a concept vanished")
            warnings.warn_explicit("a library's complaint", UserWarning, "/usr/lib/python3/somelib.py", 1)
            return {"ui": {"text": ["saved"]}, "result": ("saved",)}

    with warnings.catch_warnings(record=True) as console:
        warnings.simplefilter("always")
        out = Node().run(unique_id="3")
    assert out["ui"]["text"] == ["saved", "warning: a concept vanished"]
    assert srv.sent == [(live.WARNING_EVENT, {"node": "3", "class": "Node", "messages": ["a concept vanished"]},
                         "browser-4")]
    assert sorted(str(w.message) for w in console) == ["a concept vanished", "a library's complaint"]


class ComfyInterrupt:
    """comfy.model_management's Cancel flag and comfy.utils' ProgressBar whose hook behaves like
    main.py's (a125cd84): each update raises InterruptProcessingException once Cancel is set,
    clearing the flag as throw_exception_if_processing_interrupted does. Cancel is pressed while
    the bar reaches `cancel_at`."""

    class InterruptProcessingException(Exception):
        pass

    def __init__(self, cancel_at=None):
        self.flag, self.cancel_at, self.updates = False, cancel_at, []
        mm = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                mm.updates.append(value)
                if value == mm.cancel_at:
                    mm.flag = True  # the user's Cancel arrives during this step
                mm.throw_exception_if_processing_interrupted()

        self.utils = types.SimpleNamespace(ProgressBar=ProgressBar)

    def processing_interrupted(self):
        return self.flag

    def interrupt_current_processing(self, value=True):
        self.flag = value

    def throw_exception_if_processing_interrupted(self):
        if self.flag:
            self.flag = False
            raise self.InterruptProcessingException()

    def get_torch_device(self):
        return torch.device("cpu")

    def unload_all_models(self):
        pass

    def soft_empty_cache(self, force=False):
        pass


@pytest.mark.parametrize("kind", ["em", "finetune"])
def test_cancel_through_comfyuis_progress_hook_keeps_a_checkpoint_and_a_requeue_resumes(
        kind, bundle, started, tmp_path, monkeypatch, caplog):
    """Found by hand in a real ComfyUI (docs/comfyui_host_check.md): ComfyUI's progress hook raises
    the interruption from inside the loop's step callback, which skipped the loop's stop and its
    checkpoint, so a re-queue started again at step 1."""
    caplog.set_level(logging.INFO, "concept_em")
    monkeypatch.setattr(host, "resume_root", lambda: tmp_path / "resume")

    def node(cancel_at=None):
        comfy = ComfyInterrupt(cancel_at)
        monkeypatch.setattr(host, "_mm", comfy)
        monkeypatch.setattr(host, "_cu", comfy.utils)
        if kind == "em":
            return comfy, lambda: EMTokenStep().run(bundle, started, 4, 5e-4, 1e-2, 2, True, 4, True, unique_id="12")
        return comfy, lambda: JointFinetune().run(bundle, started, 4, 1e-3, "lora", 2, True, False, unique_id="14")

    _, run = node()
    whole = run()[0]
    comfy, run = node(cancel_at=2)
    with pytest.raises(ComfyInterrupt.InterruptProcessingException):
        run()
    assert comfy.updates == [1, 2]  # stopped before step 3
    assert list((tmp_path / "resume").glob("*/state.safetensors")), "no checkpoint kept"
    comfy, run = node()
    again = run()[0]
    assert "resuming from step 2 of 4" in caplog.text
    assert comfy.updates == [3, 4]
    step = (lambda s: s.step) if kind == "em" else (lambda s: s.finetune["step"])
    assert step(again.state) == 4
    assert torch.allclose(again.state.concepts.vectors, whole.state.concepts.vectors, atol=1e-6)
    assert not list((tmp_path / "resume").iterdir())


def _cancel_after(n):
    calls = {"n": 0}

    def interrupted():
        calls["n"] += 1
        return calls["n"] > n

    return interrupted


def test_a_cancelled_generate_or_mask_warm_up_is_never_returned_as_done(bundle, images, started, monkeypatch):
    """Found by hand in a real ComfyUI: Concept Generate cancelled mid-sampling returned its half-denoised
    images normally, so ComfyUI cached them and a re-queue saved them as if finished."""
    from nodes.output_nodes import ConceptGenerate

    monkeypatch.setattr(host, "interrupted", _cancel_after(2))
    with pytest.raises(host.Cancelled):
        ConceptGenerate().run(bundle, started, "[v1] on [v3]", "", 1, 6, 5.0, 64, 64, 1, "ddim")
    monkeypatch.setattr(host, "interrupted", _cancel_after(1))
    with pytest.raises(host.Cancelled):
        AttentionMaskInit().run(bundle, images[:1], "[v1] and [v2]", "", 2, 0.5, 3, 0, 0)  # 3 warm-up steps
    monkeypatch.setattr(host, "interrupted", lambda: False)
    img, = ConceptGenerate().run(bundle, started, "[v1] on [v3]", "", 1, 2, 5.0, 64, 64, 1, "ddim")
    assert img.shape == (1, 64, 64, 3)
