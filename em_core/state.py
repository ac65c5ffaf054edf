"""The learned state of a run and its files: one safetensors file is the commit point.

OUT/state.safetensors  vectors, optimiser moments, masks, mask history; settings as JSON metadata
OUT/state.json         the same metadata, readable
OUT/history.json       losses per step, mask changes per refresh (a readable copy; the
                       state file's header holds the authoritative one)
OUT/masks/imgI_vN.png  each concept's mask on each image, at the image's own size
OUT/weights.safetensors the joint fine-tune's weight delta or LoRA, once there is one
OUT/finetune_optimizer.safetensors  the fine-tune's AdamW moments, so a resumed fine-tune goes on
                       as an unbroken one (written one tensor at a time, read memory-mapped)
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import inside, prepare_out, write_atomic, write_json
from .concepts import ConceptSet
from .config import LearnConfig, removed_settings
from .images import mask_to_image
from .integrity import (DIGEST_KEY, MOMENTS_AGAIN, BadFile, check_moments_file, check_state, check_weights_file,
                        hash_tensor, read_failure, with_digest)
from .weights import TunedWeights

FORMAT = "em_core.state/1"


@dataclass
class LearnState:
    concepts: ConceptSet
    images: list[dict]  # path, prompt, names, size (W, H), original_size (W, H)
    config: LearnConfig
    masks: list = field(default_factory=list)  # per image: (K_i, H, W) bool at working size, or None
    fixed: list = field(default_factory=list)  # per image: names whose masks the user gave
    step: int = 0  # steps done, warm-up included
    run_from: int = 0  # EM steps (after warm-up) done when the current run began; see em_core/steps.py
    history: dict = field(default_factory=lambda: {"steps": [], "refreshes": []})
    mask_history: list = field(default_factory=list)  # [{"step": s, "masks": [(K_i, h, w) float per image]}]
    optimizer: dict | None = None  # AdamW moments for the vectors: exp_avg, exp_avg_sq, step
    status: str = "new"  # new | running | done | nan | interrupted | cancelled
    message: str = ""
    model: str = ""
    weights: TunedWeights | None = None  # from the joint fine-tune
    finetune: dict | None = None  # {config, step, status, message}; "scaler": fp16 GradScaler's state
    # The fine-tune's AdamW state: {"step": fine-tune step, "state": {name: {step, exp_avg, exp_avg_sq}}};
    # shared between copies, never changed in place (the fine-tune restores copies of it).
    finetune_optimizer: dict | None = None

    def copy(self) -> "LearnState":
        return LearnState(
            concepts=self.concepts.copy(), images=[dict(i) for i in self.images],
            config=LearnConfig.from_dict(self.config.to_dict()),
            masks=[None if m is None else m.copy() for m in self.masks], fixed=[list(f) for f in self.fixed],
            step=self.step, run_from=self.run_from, history=json.loads(json.dumps(self.history)),
            mask_history=[{"step": h["step"], "masks": [m.clone() for m in h["masks"]]} for h in self.mask_history],
            optimizer=None if self.optimizer is None else {k: (v.clone() if torch.is_tensor(v) else v)
                                                            for k, v in self.optimizer.items()},
            status=self.status, message=self.message, model=self.model,
            weights=None if self.weights is None else TunedWeights(
                self.weights.kind, {k: v.clone() for k, v in self.weights.tensors.items()}, self.weights.rank,
                self.weights.alpha),
            finetune=json.loads(json.dumps(self.finetune)), finetune_optimizer=self.finetune_optimizer,
        )

    def concept_mask(self, image_index: int, name: str) -> np.ndarray:
        names = self.images[image_index]["names"]
        if name not in names:
            raise KeyError(f"{name} is not in image {image_index + 1}; it shows {names}")
        return self.masks[image_index][names.index(name)]

    def meta(self) -> dict:
        return {
            "format": FORMAT, "model": self.model, "step": self.step, "status": self.status, "message": self.message,
            "run_from": self.run_from,
            "config": self.config.to_dict(), "concepts": self.concepts.names, "init_words": self.concepts.init_words,
            "images": self.images, "fixed": self.fixed,
            "optimizer_step": None if self.optimizer is None else int(self.optimizer["step"]),
            "mask_history_steps": [h["step"] for h in self.mask_history],
            "finetune": self.finetune, "weights": None if self.weights is None else self.weights.meta(),
            "finetune_optimizer_step": None if self.finetune_optimizer is None else self.finetune_optimizer["step"],
        }


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


_DIGEST_SLOT = "sha256:" + "?" * 64  # the header's digest until the tensors have been hashed


def write_safetensors_streaming(tensors: dict, path, metadata: dict) -> None:
    """The safetensors format, written one tensor at a time. safetensors' save_file first copies every
    tensor into memory at once, which for a full SD 1.5 fine-tune's moments is 7.6 GB more. The header
    carries the tensors' digest (integrity.tensor_digest), hashed while they are written and put in
    its slot, of the same length, at the end: one pass over the tensors."""
    header, offset = {"__metadata__": {**metadata, DIGEST_KEY: _DIGEST_SLOT}}, 0
    for k in sorted(tensors):
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    slot = head.index(_DIGEST_SLOT.encode())
    h = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for k in sorted(tensors):
            t = tensors[k].detach().to("cpu").contiguous()
            hash_tensor(h, k, t)
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.seek(8 + slot)
        f.write(("sha256:" + h.hexdigest()).encode())


def read_safetensors_mapped(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, the tensors memory-mapped copy-on-write: nothing is
    read until used, and pages read stay the file's (reclaimable), not the process's."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for k, h in header.items():
        begin, end = h["data_offsets"]
        if h["dtype"] == "BF16":
            raw = np.memmap(path, np.int16, "c", 8 + n + begin, ((end - begin) // 2,)) if end > begin else np.zeros(0, np.int16)
            out[k] = torch.from_numpy(raw).view(torch.bfloat16).reshape(h["shape"])
            continue
        dt = _NP[h["dtype"]]
        count = (end - begin) // np.dtype(dt).itemsize
        raw = np.memmap(path, dt, "c", 8 + n + begin, (count,)) if count else np.zeros(0, dt)
        out[k] = torch.from_numpy(raw).reshape(h["shape"])
    return out, meta


def _save_finetune_optimizer(state, out: Path) -> None:
    path = inside(out, "finetune_optimizer.safetensors")
    fo = state.finetune_optimizer
    if fo is None:
        if path.exists():
            path.unlink()  # a stale one: the state file names none
        return
    tensors = {f"{name}.{key}": s[key] for name, s in fo["state"].items() for key in ("exp_avg", "exp_avg_sq")}
    meta = {"em_core.finetune_optimizer": json.dumps({"step": fo["step"],
                                                      "adam_steps": {n: s["step"] for n, s in fo["state"].items()}})}
    write_atomic(path, lambda tmp: write_safetensors_streaming(tensors, tmp, meta))


def _load_finetune_optimizer(out: Path, step) -> dict | None:
    """The saved moments if the state file names them and the file is theirs; else None, with a warning."""
    import warnings

    if step is None:
        return None
    path = Path(out) / "finetune_optimizer.safetensors"
    try:
        tensors, meta = read_safetensors_mapped(path)
        info = json.loads(meta["em_core.finetune_optimizer"])
    except Exception as exc:  # missing, unreadable, damaged, foreign: said which
        kind = type(exc).__name__
        if type(exc).__module__ != "builtins":
            kind = f"{type(exc).__module__}.{kind}"
        why = "is missing" if not path.is_file() else f"could not be read ({kind}: {exc})"
        warnings.warn(f"state: {path} {why}; {MOMENTS_AGAIN}", stacklevel=3)
        return None
    try:  # the digest and every moment, as the state's other files are checked
        check_moments_file(path, meta, info, tensors)
    except BadFile as exc:
        warnings.warn(str(exc), stacklevel=3)
        return None
    if info["step"] != step:
        warnings.warn(f"state: {path} is from fine-tune step {info['step']}, the state from {step}; "
                      "a resumed fine-tune starts AdamW afresh", stacklevel=3)
        return None
    return {"step": step, "state": {n: {"step": s, "exp_avg": tensors[f"{n}.exp_avg"],
                                        "exp_avg_sq": tensors[f"{n}.exp_avg_sq"]}
                                    for n, s in info["adam_steps"].items()}}


def mask_png_name(image_index: int, name: str) -> str:
    return f"img{image_index + 1}_{name[1:-1]}.png"


def save_state(state: LearnState, out: str | Path) -> Path:
    out = prepare_out(out)
    tensors = {"concepts.vectors": state.concepts.vectors.detach().float().cpu().contiguous()}
    if state.optimizer is not None:
        tensors["optimizer.exp_avg"] = state.optimizer["exp_avg"].float().cpu().contiguous()
        tensors["optimizer.exp_avg_sq"] = state.optimizer["exp_avg_sq"].float().cpu().contiguous()
    for i, m in enumerate(state.masks):
        if m is not None:
            tensors[f"masks.{i}"] = torch.from_numpy(np.ascontiguousarray(m, dtype=np.uint8))
    for r, h in enumerate(state.mask_history):
        for i, m in enumerate(h["masks"]):
            tensors[f"mask_history.{r}.{i}"] = m.detach().to(torch.float16).cpu().contiguous()
    if state.weights is not None:
        # Written before the state file, which names the fine-tune step it belongs to.
        wt = {k: v.contiguous() for k, v in state.weights.tensors.items()}
        wmeta = with_digest({"em_core.weights": json.dumps(state.weights.meta())}, wt)
        write_atomic(inside(out, "weights.safetensors"), lambda tmp: save_file(wt, tmp, metadata=wmeta))
    _save_finetune_optimizer(state, out)  # also before the state file, which names its step
    meta = state.meta()
    # The history rides in the commit file too, so it can never disagree with the tensors.
    header = with_digest({"em_core": json.dumps(meta), "history": json.dumps(state.history)}, tensors)
    write_atomic(inside(out, "state.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata=header))
    write_json(inside(out, "state.json"), meta)
    write_json(inside(out, "history.json"), state.history)
    for i, m in enumerate(state.masks):
        if m is None:
            continue
        for k, name in enumerate(state.images[i]["names"]):
            img = mask_to_image(m[k].astype(np.float32), tuple(state.images[i]["original_size"]))
            write_atomic(inside(out, Path("masks") / mask_png_name(i, name)), lambda tmp: img.save(tmp, format="PNG"))
    return out


def saved_progress(out: str | Path) -> dict | None:
    """The steps the run folder's commit file holds, from its header alone (no tensors read):
    {"step", "status", "finetune_step"}; None when there is no state file or it will not parse."""
    from safetensors import safe_open

    path = Path(out) / "state.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("em_core", "null"))
        ft = meta.get("finetune") or {}
        return {"step": int(meta["step"]), "status": meta.get("status"),
                "finetune_step": None if ft.get("step") is None else int(ft["step"])}
    except Exception:  # missing, damaged or foreign: nothing readable is held
        return None


def load_state(out: str | Path) -> LearnState:
    path = Path(out) / "state.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"state: {path} not found; point to the OUT folder of a `learn` run")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get("em_core", "null"))
        history = json.loads(header.get("history", '{"steps": [], "refreshes": []}'))
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own errors, the system's, JSON's: each named for what it is
        raise read_failure("state", path, exc, "rerun `learn` into a fresh folder") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"state: {path} is not an em_core state file (format {FORMAT})")
    removed = removed_settings(meta.get("config") or {})
    if removed:
        raise ValueError(f"state: {path} is a run with {', '.join(removed)}, settings this version no longer has "
                         "(removed in issue 18: neither measured better than the default); it cannot go on as it "
                         "began. Its concepts.safetensors still loads; learn afresh into a new folder to go on")
    check_state(path, header, meta, tensors)
    concepts = ConceptSet(meta["concepts"], meta["init_words"], tensors["concepts.vectors"])
    masks = []
    for i in range(len(meta["images"])):
        t = tensors.get(f"masks.{i}")
        masks.append(None if t is None else t.numpy().astype(bool))
    mask_history = [
        {"step": s, "masks": [tensors[f"mask_history.{r}.{i}"].float() for i in range(len(meta["images"]))
                              if f"mask_history.{r}.{i}" in tensors]}
        for r, s in enumerate(meta["mask_history_steps"])
    ]
    optimizer = None
    if "optimizer.exp_avg" in tensors:
        optimizer = {"exp_avg": tensors["optimizer.exp_avg"], "exp_avg_sq": tensors["optimizer.exp_avg_sq"],
                     "step": meta["optimizer_step"]}
    weights = None
    if meta.get("weights"):
        wpath = Path(out) / "weights.safetensors"
        try:
            wt = load_file(str(wpath))
            with safe_open(str(wpath), framework="pt") as f:
                wheader = f.metadata() or {}
        except Exception as exc:
            if not wpath.is_file():
                raise FileNotFoundError(f"state: {wpath} is missing; the state names tuned weights that "
                                        "should be beside it") from exc
            raise read_failure("state", wpath, exc, "the tuned weights are lost: fine-tune again") from exc
        w = meta["weights"]
        check_weights_file(wpath, wheader, w, wt)
        weights = TunedWeights(w["kind"], wt, w.get("rank"), w.get("alpha"))
    return LearnState(
        weights=weights, finetune=meta.get("finetune"),
        finetune_optimizer=_load_finetune_optimizer(out, meta.get("finetune_optimizer_step")),
        concepts=concepts, images=meta["images"], config=LearnConfig.from_dict(meta["config"]), masks=masks,
        fixed=meta["fixed"], step=meta["step"], run_from=meta.get("run_from", 0), history=history,
        mask_history=mask_history, optimizer=optimizer,
        status=meta["status"], message=meta["message"], model=meta["model"],
    )
