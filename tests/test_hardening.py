"""Issue 17: crafted and damaged files (run states, their weights and fine-tune moments), the run
folder's lock and writes, what a Ctrl-C leaves on disk, deterministic exports, clear messages for
bad input (parts 1, 5, 6, 7, 8, 9)."""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from em_core.cli import SHIPPED_MODEL, main
from em_core.concept_file import load_concepts, save_concepts, save_run
from em_core.concepts import ConceptSet
from em_core.config import LearnConfig
from em_core.dataset import check_prompts
from em_core.images import open_image, open_mask
from em_core.integrity import DIGEST_KEY, BadFile
from em_core.state import LearnState, load_state, save_state
from em_core.weights import TunedWeights

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def _width(bundle) -> int:
    return bundle.text_encoder.get_input_embeddings().weight.shape[1]


def _state(bundle, image_path=None, weights=None, masks=True, optimizer=True) -> LearnState:
    """A small hand-made run state: two concepts on one 64x64 image, masks and moments."""
    dim = _width(bundle)
    g = torch.Generator().manual_seed(0)
    concepts = ConceptSet(["[v1]", "[v2]"], {"[v1]": "red", "[v2]": None}, torch.randn(2, dim, generator=g))
    rec = {"path": str(image_path or "/nowhere/x.png"), "prompt": "a photo of [v1] and [v2]",
           "names": ["[v1]", "[v2]"], "size": [64, 64], "original_size": [64, 64]}
    m = np.zeros((2, 64, 64), bool)
    m[0, :32], m[1, 32:] = True, True
    st = LearnState(concepts=concepts, images=[rec], config=LearnConfig(steps=4), masks=[m if masks else None],
                    fixed=[[]], step=2, model=bundle.source, weights=weights)
    if masks:
        st.mask_history = [{"step": 0, "masks": [torch.rand(2, 8, 8, generator=g)]}]
    if optimizer:
        st.optimizer = {"exp_avg": torch.randn(2, dim, generator=g), "exp_avg_sq": torch.rand(2, dim, generator=g),
                        "step": 2}
    return st


def _full_weights(bundle) -> TunedWeights:
    name, p = next((n, p) for n, p in bundle.unet.named_parameters() if p.ndim == 2)
    g = torch.Generator().manual_seed(1)
    return TunedWeights("full", {f"unet.{name}": torch.randn(p.shape, generator=g) * 1e-3})


def _rewrite(path: Path, edit, drop_digest: bool = False) -> None:
    """Rewrites a safetensors file with `edit(tensors, meta)` applied to its tensors and em_core
    header, keeping the digest as written (a crafted file) unless `drop_digest` (an old file)."""
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    key = "em_core"
    meta = json.loads(header[key])
    edit(tensors, meta)
    header[key] = json.dumps(meta)
    if drop_digest:
        header.pop(DIGEST_KEY, None)
    save_file(tensors, str(path), metadata=header)


def _flip_a_tensor_byte(path: Path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    begin = json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[8 + n + begin + 1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture
def concept_file(bundle, tmp_path):
    return save_concepts(_state(bundle, weights=_full_weights(bundle)), bundle, tmp_path / "c.safetensors")


@pytest.fixture
def image64(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------- part 1: concept files

def test_a_saved_concept_file_carries_a_digest_and_loads(bundle, concept_file):
    with safe_open(str(concept_file), framework="pt") as f:
        assert f.metadata()[DIGEST_KEY].startswith("sha256:")
    cb = load_concepts(concept_file, bundle)
    assert cb.names == ["[v1]", "[v2]"] and cb.weights.kind == "full"


@pytest.mark.parametrize("edit, field, problem", [
    (lambda t, m: t["concepts.vectors"].__setitem__((0, 3), float("nan")), "concepts.vectors", "NaN or infinite"),
    (lambda t, m: t.__setitem__("concepts.vectors", t["concepts.vectors"][:, :7].contiguous()),
     "concepts.vectors", "7 wide, but the header's text_dim is 32"),
    (lambda t, m: t.__setitem__("concepts.vectors", torch.cat([t["concepts.vectors"]] * 2)),
     "concepts.vectors", "4 vectors for 2 names"),
    (lambda t, m: t.__setitem__("concepts.vectors", t["concepts.vectors"].to(torch.int32)),
     "concepts.vectors", "dtype int32"),
    (lambda t, m: m.__setitem__("names", ["[v1]", "[v1]"]), "names", "more than once"),
    (lambda t, m: t.__setitem__("masks.0", t["masks.0"][:, :32].contiguous()), "masks.0", "expected (2, 64, 64)"),
    (lambda t, m: t.__setitem__("masks.0", t["masks.0"][:1].contiguous()), "masks.0", "1 masks, but image 1 shows 2"),
    (lambda t, m: t.__setitem__("masks.5", t["masks.0"].clone()), "masks.5", "no such image"),
    (lambda t, m: t["masks.0"].__setitem__((0, 0, 0), 7), "masks.0", "values up to 7"),
    (lambda t, m: t.__setitem__(next(k for k in t if k.startswith("weights.")),
                                torch.full_like(t[next(k for k in t if k.startswith("weights."))], float("inf"))),
     "weights.unet", "NaN or infinite"),
])
def test_crafted_concept_files_are_refused_naming_file_and_field(bundle, concept_file, edit, field, problem):
    _rewrite(concept_file, edit, drop_digest=True)  # as an older writer (no digest) would have left it
    with pytest.raises(BadFile) as err:
        load_concepts(concept_file, bundle)
    msg = str(err.value)
    assert str(concept_file) in msg and field in msg and problem in msg


def test_a_concept_file_whose_tensor_bytes_changed_fails_its_digest(bundle, concept_file):
    _flip_a_tensor_byte(concept_file, "concepts.vectors")  # still finite, still the right shape
    with pytest.raises(BadFile, match="do not match the digest"):
        load_concepts(concept_file)


def test_a_concept_file_written_before_digests_still_loads_and_is_still_checked(bundle, concept_file):
    _rewrite(concept_file, lambda t, m: None, drop_digest=True)
    with safe_open(str(concept_file), framework="pt") as f:
        assert DIGEST_KEY not in f.metadata()
    assert load_concepts(concept_file, bundle).names == ["[v1]", "[v2]"]


def test_full_weights_that_do_not_fit_the_model_are_refused(bundle, concept_file):
    def edit(t, m):
        k = next(k for k in t if k.startswith("weights."))
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
    _rewrite(concept_file, edit, drop_digest=True)
    assert load_concepts(concept_file).names  # without a model there is nothing to fit
    with pytest.raises(BadFile, match=r"weights\.unet\..*but this model's unet\..* is"):
        load_concepts(concept_file, bundle, allow_other_model=True)


# ----------------------------------------------------------------------------- part 1: run states

def test_a_saved_state_carries_digests_and_round_trips(bundle, tmp_path):
    save_state(_state(bundle, weights=_full_weights(bundle)), tmp_path)
    for name in ("state.safetensors", "weights.safetensors"):
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert f.metadata()[DIGEST_KEY].startswith("sha256:")
    st = load_state(tmp_path)
    assert st.step == 2 and st.weights.kind == "full"


@pytest.mark.parametrize("edit, field, problem", [
    (lambda t, m: t["optimizer.exp_avg"].__setitem__((1, 1), float("nan")), "optimizer.exp_avg", "NaN"),
    (lambda t, m: t.__setitem__("optimizer.exp_avg_sq", t["optimizer.exp_avg_sq"][:, :5].contiguous()),
     "optimizer.exp_avg_sq", "shape (2, 5), expected (2, 32)"),
    (lambda t, m: t.__setitem__("concepts.vectors", t["concepts.vectors"][:1].contiguous()),
     "concepts.vectors", "1 vectors for 2 names"),
    (lambda t, m: t.__setitem__("masks.0", torch.zeros(2, 48, 64, dtype=torch.uint8)), "masks.0",
     "expected (2, 64, 64)"),
    (lambda t, m: t.__setitem__("mask_history.0.0", torch.zeros(3, 8, 8, dtype=torch.float16)),
     "mask_history.0.0", "3 maps, but image 1 shows 2"),
    (lambda t, m: m["images"][0].__setitem__("names", ["[v1]", "[v01]"]), "images[0].names", "no leading"),
    (lambda t, m: t.__setitem__("stowaway", torch.zeros(1)), "stowaway", "not part of a run state"),
])
def test_crafted_states_are_refused_naming_file_and_field(bundle, tmp_path, edit, field, problem):
    save_state(_state(bundle), tmp_path)
    _rewrite(tmp_path / "state.safetensors", edit, drop_digest=True)
    with pytest.raises(BadFile) as err:
        load_state(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "state.safetensors") in msg and field in msg and problem in msg


def test_state_digests_catch_changed_bytes_and_old_states_still_load(bundle, tmp_path):
    save_state(_state(bundle, weights=_full_weights(bundle)), tmp_path)
    _flip_a_tensor_byte(tmp_path / "state.safetensors", "optimizer.exp_avg")
    with pytest.raises(BadFile, match="state.safetensors: the tensors do not match the digest"):
        load_state(tmp_path)
    save_state(_state(bundle, weights=_full_weights(bundle)), tmp_path)
    wkey = next(iter(load_file(str(tmp_path / "weights.safetensors"))))
    _flip_a_tensor_byte(tmp_path / "weights.safetensors", wkey)
    with pytest.raises(BadFile, match="weights.safetensors: the tensors do not match the digest"):
        load_state(tmp_path)
    save_state(_state(bundle), tmp_path)
    _rewrite(tmp_path / "state.safetensors", lambda t, m: None, drop_digest=True)  # as older versions wrote it
    assert load_state(tmp_path).step == 2


def _with_moments(bundle, out: Path) -> Path:
    """A saved state whose fine-tune moments file holds one U-Net parameter's moments at step 1."""
    st = _state(bundle)
    name, p = next((n, p) for n, p in bundle.unet.named_parameters() if p.ndim == 2)
    g = torch.Generator().manual_seed(2)
    st.finetune_optimizer = {"step": 1, "state": {f"unet.{name}": {
        "step": 1, "exp_avg": torch.randn(p.shape, generator=g), "exp_avg_sq": torch.rand(p.shape, generator=g)}}}
    save_state(st, out)
    return out / "finetune_optimizer.safetensors"


def _rewrite_moments(path: Path, edit, drop_digest: bool = False) -> None:
    """As _rewrite, for the moments file (its header key is em_core.finetune_optimizer)."""
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    info = json.loads(header["em_core.finetune_optimizer"])
    edit(tensors, info)
    header["em_core.finetune_optimizer"] = json.dumps(info)
    if drop_digest:
        header.pop(DIGEST_KEY, None)
    save_file(tensors, str(path), metadata=header)


def test_the_fine_tune_moments_file_carries_a_digest_and_round_trips(bundle, tmp_path):
    from em_core.integrity import tensor_digest

    path = _with_moments(bundle, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()[DIGEST_KEY]
    assert stored == tensor_digest(load_file(str(path)))  # what the streaming writer hashed is what it wrote
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fo = load_state(tmp_path).finetune_optimizer
    (name, s), = fo["state"].items()
    assert fo["step"] == 1 and s["step"] == 1 and bool((s["exp_avg_sq"] >= 0).all())


def test_fine_tune_moments_whose_bytes_changed_fail_their_digest(bundle, tmp_path):
    path = _with_moments(bundle, tmp_path)
    _flip_a_tensor_byte(path, next(iter(load_file(str(path)))))
    with pytest.warns(UserWarning, match=r"finetune_optimizer.safetensors: the tensors do not match the digest.*"
                                         r"a resumed fine-tune starts AdamW afresh"):
        st = load_state(tmp_path)
    assert st.finetune_optimizer is None and st.step == 2  # the rest of the run still loads


def _first(t):
    return next(k for k in t if k.endswith(".exp_avg"))


@pytest.mark.parametrize("edit, field, problem", [
    (lambda t, i: t[_first(t)].view(-1).__setitem__(3, float("nan")), ".exp_avg'", "NaN"),
    (lambda t, i: t[_first(t) + "_sq"].view(-1).__setitem__(0, -1.0), ".exp_avg_sq'", "negative second moments"),
    (lambda t, i: t.__setitem__(_first(t) + "_sq", t[_first(t) + "_sq"][:1].contiguous()), ".exp_avg_sq'",
     "expected ("),
    (lambda t, i: t.pop(_first(t) + "_sq"), ".exp_avg_sq'", "missing"),
    (lambda t, i: t.__setitem__("stowaway", torch.zeros(1)), "'stowaway'", "not a moment of a parameter"),
    (lambda t, i: i["adam_steps"].update({k: -3 for k in i["adam_steps"]}), "adam_steps", "-3"),
])
def test_crafted_fine_tune_moments_are_dropped_with_a_warning_naming_file_and_field(bundle, tmp_path, edit, field,
                                                                                    problem):
    path = _with_moments(bundle, tmp_path)
    _rewrite_moments(path, edit, drop_digest=True)  # no digest: the field checks alone must catch it
    with pytest.warns(UserWarning) as seen:
        st = load_state(tmp_path)
    msg = " | ".join(str(w.message) for w in seen)
    assert str(path) in msg and field in msg and problem in msg and "starts AdamW afresh" in msg
    assert st.finetune_optimizer is None


def test_fine_tune_moments_written_before_digests_still_load(bundle, tmp_path):
    path = _with_moments(bundle, tmp_path)
    _rewrite_moments(path, lambda t, i: None, drop_digest=True)
    assert load_state(tmp_path).finetune_optimizer["step"] == 1


# ----------------------------------------------------------------------------- part 5: the run folder

def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds FOLDER's lock until killed."""
    code = ("import sys, time; from em_core.runlock import hold; hold(sys.argv[1]); print('held', flush=True); "
            "time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_while_the_first_runs(tiny_dir, bundle, image64, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out)
    try:
        rc = main(["learn", "--model", str(tiny_dir), "--image", str(image64), "--prompt", "[v1]", "--steps", "1",
                   "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by another process (pid {holder.pid}" in err
        assert not (out / "state.safetensors").exists()
        # The engine's own saves (what the nodes call) are refused too.
        from em_core.runlock import RunLocked

        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            save_run(_state(bundle), bundle, out)
    finally:
        holder.kill()
        holder.wait()
    save_run(_state(bundle), bundle, out)  # the killed holder's lock is stale now
    assert load_state(out).step == 2


def test_a_stale_lock_is_taken_over_and_killed_saves_temp_files_are_cleaned(tmp_path, capsys):
    from em_core.runlock import LOCK_NAME, holds, run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid}))
    (tmp_path / "masks").mkdir()
    left = [tmp_path / ".state.safetensors.k2j4_x9q.tmp", tmp_path / ".weights.safetensors.abcd1234.tmp",
            tmp_path / "masks" / ".img1_v1.png.zz99yy88.tmp"]
    kept = [tmp_path / ".notes.txt.abcd1234.tmp", tmp_path / "state.safetensors.bak"]
    for p in left + kept:
        p.write_bytes(b"partial")
    with run_lock(tmp_path):
        assert holds(tmp_path)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"took over the lock of pid {dead.pid}" in capsys.readouterr().err
        assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert not (tmp_path / LOCK_NAME).exists() and not holds(tmp_path)


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors 0.6 on
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
])  # ... and safetensors 0.4.3 to 0.5.3 (the floor's own wording: a raw traceback before)
def test_a_full_disk_gives_a_clear_message_and_keeps_the_previous_state(bundle, tmp_path, monkeypatch, message):
    from safetensors import SafetensorError

    from em_core.atomic import WriteError

    save_state(_state(bundle), tmp_path)
    later = _state(bundle)
    later.step = 3

    def full(*a, **k):
        raise SafetensorError(message)

    monkeypatch.setattr("em_core.state.save_file", full)
    with pytest.raises(WriteError) as err:
        save_state(later, tmp_path)
    assert err.value.errno == errno.ENOSPC
    assert "state.safetensors" in str(err.value) and "the disk is full" in str(err.value)
    assert "previous version is kept" in str(err.value)
    assert load_state(tmp_path).step == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_really_full_disk_keeps_the_previous_state(bundle, tmp_path):
    """The same on a real full file system: a 1 MB tmpfs, where the test may mount one."""
    from em_core.atomic import WriteError

    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        save_state(_state(bundle), small)
        later = _state(bundle, weights=TunedWeights("full", {"unet.x.weight": torch.zeros(1024, 1024)}))  # 4 MB
        later.step = 3
        with pytest.raises(WriteError, match=r"weights\.safetensors \(No space left on device: the disk is full\)"):
            save_state(later, small)
        assert load_state(small).step == 2 and not list(small.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def _read_only_folder(tmp_path):
    """A real read-only file system (a tmpfs mounted ro) where the test may mount one, else None."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        os.chmod(ro, 0o555)
        return ro, None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    return (ro, ro) if r.returncode == 0 else (None, None)


def test_an_output_folder_on_a_read_only_file_system_is_refused_by_name(tiny_dir, tmp_path, capsys):
    ro, mounted = _read_only_folder(tmp_path)
    if ro is None:
        pytest.skip("cannot make a read-only folder here")
    try:
        rc = main(["generate", "--model", str(tiny_dir), "--prompt", "a dog", "--steps", "1", "--out",
                   str(ro / "images"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and str(ro / "images") in err and "give another folder" in err
        rc = main(["generate", "--model", str(tiny_dir), "--prompt", "a dog", "--steps", "1", "--out", str(ro),
                   "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"cannot write in {ro}" in err
    finally:
        if mounted:
            subprocess.run(["umount", str(mounted)], check=False)


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from em_core.atomic import WriteError, write_atomic

    target = tmp_path / "x.txt"
    target.write_text("old")

    def readonly(tmp):
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(WriteError, match=r"cannot write .*x\.txt \(Read-only file system: the folder is on a "
                                         r"read-only file system\); its previous version is kept"):
        write_atomic(target, readonly)
    assert target.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("second", [False, True])
def test_after_ctrl_c_the_message_names_the_step_really_on_disk(tiny_dir, image64, tmp_path, capsys, monkeypatch,
                                                                second):
    """A Ctrl-C lands at step 4's save; the save at exit then writes step 4, unless a second Ctrl-C
    stops it too, and then the folder still holds step 2 from the save before (the message used
    to say 'the last completed step is saved' either way)."""
    from em_core import em_loop

    real, calls = em_loop.save_run, []

    def save_run(state, bundle, out):
        calls.append((state.step, state.status))
        if state.step == 4 and (len(calls) == 2 or second):  # step 4's periodic save, then the one at exit
            raise KeyboardInterrupt
        real(state, bundle, out)

    monkeypatch.setattr(em_loop, "save_run", save_run)
    out = tmp_path / "run"
    rc = main(["learn", "--model", str(tiny_dir), "--image", str(image64), "--prompt", "[v1]", "--steps", "8",
               "--warmup-steps", "0", "--save-every", "2", "--refresh-every", "0", "--mask-timesteps", "2",
               "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 130 and calls == [(2, "running"), (4, "running"), (4, "interrupted")]
    on_disk = load_state(out)
    if second:
        assert on_disk.step == 2 and on_disk.status == "running"
        assert f"interrupted again during the save at exit, which did not finish: {out} holds step 2" in err
        assert "later steps are lost" in err
    else:
        assert on_disk.step == 4 and on_disk.status == "interrupted"
        assert f"interrupted: {out} holds step 4; run the same command to resume" in err
    assert "last completed step is saved" not in err


def test_the_fine_tune_interrupt_message_reads_the_fine_tune_step_from_disk(bundle, tmp_path):
    from em_core.training import SaveInterrupted, interrupted_message, saved_on_exit

    assert interrupted_message(KeyboardInterrupt(), tmp_path, finetune=True) == (
        f"interrupted: {tmp_path} holds no readable run state; run the same command to continue")
    st = _state(bundle)
    save_state(st, tmp_path)
    assert f"{tmp_path} holds no fine-tune step yet (the learned state, step 2)" in interrupted_message(
        KeyboardInterrupt(), tmp_path, finetune=True)
    st.finetune = {"config": {}, "step": 3, "status": "running", "message": ""}
    save_state(st, tmp_path)
    st.finetune = {**st.finetune, "step": 5, "status": "interrupted"}  # in memory only: its save is cut short

    def save():
        raise KeyboardInterrupt

    with pytest.raises(SaveInterrupted) as err:
        with saved_on_exit(save, lambda: None):
            raise KeyboardInterrupt
    msg = interrupted_message(err.value, tmp_path, finetune=True)
    assert msg.startswith("interrupted again during the save at exit") and f"{tmp_path} holds fine-tune step 3" in msg
    assert isinstance(err.value, KeyboardInterrupt)  # callers that catch Ctrl-C still do


# ----------------------------------------------------------------------------- part 6: deterministic export

def test_the_same_concept_file_exports_the_same_lora_bytes_without_touching_the_global_rng(bundle, concept_file,
                                                                                        tmp_path):
    from em_core.export import export_concepts

    cb = load_concepts(concept_file)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = export_concepts(cb, tmp_path / "a", "n", rank=2)["lora"].read_bytes()
    assert torch.equal(torch.get_rng_state(), before)  # the global generator did not move
    torch.manual_seed(999)  # whatever state it is in
    b = export_concepts(cb, tmp_path / "b", "n", rank=2)["lora"].read_bytes()
    assert a == b


def test_the_seeded_svd_still_recovers_a_low_rank_delta():
    from em_core.export import svd_lowrank

    g = torch.Generator().manual_seed(0)
    for shape in ((40, 24), (24, 40)):
        low = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
        u, s, v = svd_lowrank(low, q=8, niter=4, seed=7)
        assert torch.allclose((u[:, :3] * s[:3]) @ v[:, :3].T, low, atol=1e-4)


# ----------------------------------------------------------------------------- part 7: messages, not tracebacks

def test_an_image_over_the_decompression_bomb_limit_is_refused_by_name(image64, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2 x 1000: PIL's error
    with pytest.raises(ValueError, match=r"--image: .*img\.png has more pixels than PIL opens safely"):
        open_image(image64, "--image")


def _shipped():
    if not (SHIPPED_MODEL / "model_index.json").is_file():
        pytest.skip("the shipped tiny-world model is missing")
    return SHIPPED_MODEL  # 64 wide: the random tiny model is 32


def test_resuming_a_run_with_a_model_of_another_width_is_refused(bundle, image64, tmp_path, capsys):
    other = _shipped()
    out = tmp_path / "run"
    save_state(_state(bundle, image_path=image64.resolve()), out)
    rc = main(["learn", "--model", str(other), "--image", str(image64), "--prompt", "a photo of [v1] and [v2]",
               "--steps", "4", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "embeds tokens in 64 dimensions" in err and "with 32" in err and str(out) in err
    rc = main(["finetune", "--state", str(out), "--model", str(other), "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "embeds tokens in 64 dimensions" in err


def test_generate_with_another_models_width_is_refused_even_when_allowed(concept_file, tmp_path, capsys):
    other = _shipped()
    rc = main(["generate", "--model", str(other), "--concepts", str(concept_file), "--allow-other-model",
               "--prompt", "[v1]", "--steps", "1", "--out", str(tmp_path / "g"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(concept_file) in err and "32 wide" in err and "embeds tokens in 64" in err


@pytest.mark.parametrize("rank", ["-4", "0"])
def test_export_with_a_bad_rank_is_refused_before_anything_is_written(concept_file, tmp_path, capsys, rank):
    out = tmp_path / "comfy"
    assert main(["export", "--concepts", str(concept_file), "--out", str(out), "--rank", rank]) == 2
    assert f"--rank {rank}" in capsys.readouterr().err
    assert not out.exists()
    from em_core.export import export_concepts

    with pytest.raises(ValueError, match="rank"):
        export_concepts(load_concepts(concept_file), out, "n", rank=int(rank))
    assert not out.exists()


# ----------------------------------------------------------------------------- part 8: bad input

def test_a_mask_of_another_size_is_refused_naming_the_size(image64, tmp_path, capsys):
    small = tmp_path / "m.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(small)
    with pytest.raises(ValueError, match=r"is 48x32 pixels, but its image is 64x64"):
        open_mask(small, (64, 64), "--mask", image_size=(64, 64))
    assert main(["refine-masks", "--image", str(image64), "--mask", str(small), "--out", str(tmp_path / "o")]) == 2
    assert "its image is 64x64" in capsys.readouterr().err


def test_an_all_white_mask_is_accepted_with_a_warning(tmp_path):
    white = tmp_path / "white.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(white)
    with pytest.warns(UserWarning, match="white everywhere"):
        assert open_mask(white, (64, 64), image_size=(64, 64)).all()


def test_a_prompt_past_the_text_encoders_limit_is_refused_briefly(tiny_dir, image64, tmp_path, capsys):
    long = "a photo of [v1] " + "and a very long description " * 2000 + "with [v2]"
    rc = main(["learn", "--model", str(tiny_dir), "--image", str(image64), "--prompt", long, "--steps", "1",
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "[v2] would fall off its end" in err and "the text encoder reads 75" in err
    assert len(err) < 400 and "(56,025 characters)" in err  # its length, not its text
    assert not (tmp_path / "o" / "state.safetensors").exists()


@pytest.mark.parametrize("prompt", ["a photo of [v0]", "[v1] and [v01]"])
def test_concept_names_start_at_v1_without_leading_zeros(prompt, tiny_dir, image64, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"numbered \[v1\], \[v2\], \.\.\. from 1, with no leading zeros"):
        check_prompts([image64], [prompt])
    assert main(["learn", "--model", str(tiny_dir), "--image", str(image64), "--prompt", prompt, "--steps", "1",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no leading zeros" in capsys.readouterr().err


def test_continuing_a_finetune_with_other_settings_is_refused(bundle, tmp_path, capsys):
    from em_core.finetune import FinetuneConfig

    st = _state(bundle)
    st.finetune = {"config": FinetuneConfig(steps=2, mode="full").to_dict(), "step": 1, "status": "interrupted",
                   "message": ""}
    save_state(st, tmp_path)
    assert main(["finetune", "--state", str(tmp_path), "--mode", "lora", "--steps", "2", "--quiet"]) == 2
    assert "--mode lora: the fine-tune in" in capsys.readouterr().err
    assert main(["finetune", "--state", str(tmp_path), "--lr", "-1", "--steps", "2", "--quiet"]) == 2
    assert "--lr -1.0: a learning rate must be above 0" in capsys.readouterr().err
    assert main(["finetune", "--state", str(tmp_path), "--lr", "1e-3", "--steps", "2", "--quiet"]) == 2
    assert "continues with it" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--iterations", "0"], "--iterations 0"),
                                           (["--max-side", "-5"], "--max-side -5")])
def test_refine_masks_refuses_impossible_settings(image64, tmp_path, capsys, args, message):
    mask = tmp_path / "m.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    assert main(["refine-masks", "--image", str(image64), "--mask", str(mask), "--out", str(tmp_path / "o"),
                 *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_animated_gif_uses_frame_one_with_a_note(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(UserWarning, match=r"anim\.gif has 3 frames; using frame 1"):
        img = open_image(path)
    assert img.getpixel((8, 8))[0] > 200 and img.getpixel((8, 8))[1] < 50


# ----------------------------------------------------------------------------- part 9: unique outputs

def test_refine_masks_of_one_name_from_two_folders_write_two_files(image64, tmp_path, capsys):
    paths = []
    for i, folder in enumerate(("a", "b", "c")):
        (tmp_path / folder).mkdir()
        m = np.zeros((64, 64), np.uint8)
        m[:, i * 20:(i + 1) * 20] = 255
        name = "Mask.png" if folder == "c" else "mask.png"  # one name to a case-blind file system
        Image.fromarray(m).save(tmp_path / folder / name)
        paths.append(tmp_path / folder / name)
    out = tmp_path / "o"
    assert main(["refine-masks", "--image", str(image64), *sum((["--mask", str(p)] for p in paths), []),
                 "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(w).name for w in written] == ["mask_refined.png", "mask_2_refined.png", "Mask_3_refined.png"]
    assert len({Path(w).read_bytes() for w in written}) == 3
