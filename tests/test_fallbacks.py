"""Issue 17, part 2: no silent fallbacks. Where something fails and the code carries on another way,
it says what failed (a warning naming the cause) or refuses; a file that will not load is described
by what went wrong, not called "corrupt or truncated" whatever the cause."""
from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from em_core.concept_file import load_concepts, save_concepts
from em_core.finetune import _adamw
from em_core.model_io.single_file import load_single_file
from em_core.state import load_state, save_state
from nodes import host
from test_hardening import _full_weights, _state


# ----------------------------------------------------------------------------- fused AdamW

def test_fused_adamw_is_used_where_torch_has_it():
    p = torch.nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = _adamw([{"params": [p], "lr": 1e-3}], torch.device("cpu"))
    assert opt.param_groups[0]["fused"] is True


@pytest.mark.parametrize("exc", [RuntimeError("`fused=True` requires all the params to be floating point "
                                              "Tensors of supported devices"),
                                 TypeError("__init__() got an unexpected keyword argument 'fused'")])
def test_a_fused_adamw_torch_refuses_is_replaced_with_a_warning_naming_why(monkeypatch, exc):
    real = torch.optim.AdamW

    def adamw(groups, **kw):
        if kw.get("fused"):
            raise exc
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="fused AdamW") as rec:
        opt = _adamw([{"params": [p], "lr": 1e-3}], torch.device("cpu"))
    msg = str(rec[0].message)
    assert type(exc).__name__ in msg and str(exc) in msg and "foreach" in msg
    assert not opt.param_groups[0].get("fused")


# ----------------------------------------------------------------------------- ComfyUI's model folders

def _fake_fp(monkeypatch, paths: dict, files: dict | None = None):
    """folder_paths as ComfyUI has it: an unknown kind is a KeyError (folder_names_and_paths[kind])."""
    files = files or {}
    fp = types.SimpleNamespace(get_folder_paths=lambda kind: list(paths[kind]),
                               get_filename_list=lambda kind: list(files[kind]))
    monkeypatch.setattr(host, "_fp", fp)


def test_a_folder_comfyui_has_is_used(tmp_path, monkeypatch):
    _fake_fp(monkeypatch, {"loras": [str(tmp_path / "a"), str(tmp_path / "b")]})
    assert host.folder("loras", Path("models") / "loras") == tmp_path / "a"


@pytest.mark.parametrize("paths, cause", [({}, "has no 'loras' folder type"),
                                          ({"loras": []}, "no folder registered for 'loras'")])
def test_a_folder_comfyui_lacks_is_refused_not_guessed_beside_the_working_directory(tmp_path, monkeypatch,
                                                                                  paths, cause):
    _fake_fp(monkeypatch, paths)
    with pytest.raises(LookupError, match=cause) as err:
        host.folder("loras", Path("models") / "loras")
    assert "extra_model_paths.yaml" in str(err.value)


def test_a_folder_type_comfyui_lacks_lists_nothing_with_a_warning(monkeypatch):
    _fake_fp(monkeypatch, {}, {})
    with pytest.warns(UserWarning, match="ComfyUI has no 'diffusers' folder type"):
        assert host.folders("diffusers", Path("models") / "diffusers") == []
    with pytest.warns(UserWarning, match="ComfyUI has no 'concepts' folder type"):
        assert host.list_files("concepts", Path("models") / "concepts") == []


def test_outside_comfyui_the_plain_folders_are_used_quietly(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_fp", None)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert host.folder("loras", tmp_path) == tmp_path
        assert host.folders("diffusers", tmp_path) == [tmp_path]
        assert host.list_files("concepts", tmp_path) == ["x.safetensors"]


# ----------------------------------------------------------------------------- load failures by cause

def _valid_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_file({"x": torch.zeros(1000)}, f"{d}/v.safetensors", metadata={"em_core": "{}"})
        return Path(f"{d}/v.safetensors").read_bytes()


DAMAGE = {
    "empty": (lambda raw: b"", "is empty (0 bytes)"),
    "truncated": (lambda raw: raw[: len(raw) // 2], "is truncated: its "),
    "not safetensors": (lambda raw: b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "is not a safetensors file"),
}


def _files(kind: str, bundle, tmp_path) -> tuple[Path, callable, str]:
    """(the file to damage, how it is loaded, which module reads it) for each kind of file."""
    if kind == "concepts":
        path = save_concepts(_state(bundle), bundle, tmp_path / "c.safetensors")
        return path, lambda: load_concepts(path), "em_core.concept_file"
    if kind in ("state", "weights"):
        save_state(_state(bundle, weights=_full_weights(bundle)), tmp_path)
        return tmp_path / f"{kind}.safetensors", lambda: load_state(tmp_path), "em_core.state"
    path = tmp_path / "model.safetensors"
    save_file({"cond_stage_model.transformer.x": torch.zeros(4)}, str(path))  # names an SD 1.x file
    return path, lambda: load_single_file(path), "em_core.model_io.single_file"


KINDS = ["concepts", "state", "weights", "checkpoint"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_described_by_its_damage(bundle, tmp_path, kind, damage):
    path, load, _ = _files(kind, bundle, tmp_path)
    make, says = DAMAGE[damage]
    path.write_bytes(make(_valid_bytes()))
    with pytest.raises(ValueError) as err:
        load()
    msg = str(err.value)
    assert str(path) in msg and says in msg, msg
    assert "corrupt or truncated" not in msg


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_the_system_will_not_read_is_not_called_damaged(bundle, tmp_path, monkeypatch, kind):
    import importlib

    path, load, module = _files(kind, bundle, tmp_path)
    mod = importlib.import_module(module)
    real = mod.load_file

    def refuse(p, *a, **kw):
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, *a, **kw)

    monkeypatch.setattr(mod, "load_file", refuse)
    with pytest.raises(PermissionError) as err:
        load()
    msg = str(err.value)
    assert str(path) in msg and "could not be read (PermissionError: Permission denied)" in msg, msg
    assert "corrupt" not in msg and "truncated" not in msg


@pytest.mark.parametrize("kind", KINDS)
def test_running_out_of_memory_while_loading_says_so(bundle, tmp_path, monkeypatch, kind):
    import importlib

    path, load, module = _files(kind, bundle, tmp_path)
    mod = importlib.import_module(module)

    def no_memory(p, *a, **kw):
        raise MemoryError()

    monkeypatch.setattr(mod, "load_file", no_memory)
    with pytest.raises(MemoryError, match="not enough memory to read") as err:
        load()
    if kind != "weights":  # the state file is read first: its read is the one that fails
        assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["concepts", "state"])
def test_a_header_that_is_not_json_is_named(bundle, tmp_path, kind):
    path, load, _ = _files(kind, bundle, tmp_path)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"em_core": "{not json"})
    with pytest.raises(ValueError, match="has header metadata that is not valid JSON"):
        load()


def test_missing_tuned_weights_are_called_missing(bundle, tmp_path):
    save_state(_state(bundle, weights=_full_weights(bundle)), tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors is missing; the state names tuned weights"):
        load_state(tmp_path)


def _with_finetune_moments(bundle, tmp_path):
    st = _state(bundle)
    name, p = next(iter(bundle.unet.named_parameters()))
    st.finetune_optimizer = {"step": 1, "state": {f"unet.{name}": {"step": 1, "exp_avg": torch.zeros(p.shape),
                                                                  "exp_avg_sq": torch.zeros(p.shape)}}}
    save_state(st, tmp_path)
    assert load_state(tmp_path).finetune_optimizer["step"] == 1
    return tmp_path / "finetune_optimizer.safetensors"


def test_fine_tune_moments_that_are_missing_or_unreadable_say_which(bundle, tmp_path):
    path = _with_finetune_moments(bundle, tmp_path)
    raw = path.read_bytes()
    path.unlink()
    with pytest.warns(UserWarning, match=r"finetune_optimizer.safetensors is missing; a resumed fine-tune starts"):
        assert load_state(tmp_path).finetune_optimizer is None
    path.write_bytes(raw[:5])
    with pytest.warns(UserWarning, match=r"finetune_optimizer.safetensors could not be read \(struct.error: "):
        assert load_state(tmp_path).finetune_optimizer is None
