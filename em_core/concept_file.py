"""The concept file: one .safetensors file with everything a learned concept set needs (what the
nodes Save Concepts / Load Concepts write and read; "bundle" means the base model only,
model_io.ModelBundle).

Tensors: concept vectors, masks, the fine-tuned weights (delta or LoRA). JSON metadata:
names, init words, the base model's fingerprint, settings and history. Reading never
unpickles anything, and a concept file learned on another base model is refused unless asked.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import write_atomic
from .concepts import ConceptSet
from .model_io.bundle import FAMILY_NAMES
from .integrity import BadFile, Checker, check_digest, embedding_width, read_failure, with_digest
from .weights import TunedWeights

FORMAT = "em_core.concepts/1"
PROBE_TENSORS, PROBE_VALUES = 48, 8


def _base_tensors(bundle):
    """(name, tensor) of the base weights; rows added to the token table for concepts left out."""
    base_rows = bundle.tokenizer.vocab_size
    for prefix, module in (("unet", bundle.unet), *bundle.text_modules().items(), ("vae", bundle.vae)):
        for name, p in sorted(module.state_dict().items()):
            yield f"{prefix}.{name}", (p[:base_rows] if name.endswith("token_embedding.weight") else p)


def model_identity(bundle) -> dict:
    """The base model's identity: a hash of its weight names and shapes, and a probe of values.

    The probe (a few values strided across a spread of tensors) is compared with a tolerance,
    so the same model loaded in fp32, fp16 or bf16 is recognised and another model is not.
    """
    items = list(_base_tensors(bundle))
    arch = hashlib.sha256("\n".join(f"{n}:{tuple(t.shape)}" for n, t in items).encode()).hexdigest()[:16]
    step = max(1, len(items) // PROBE_TENSORS)
    probe = []
    for _, t in items[::step]:
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(PROBE_VALUES, flat.numel())).long().to(flat.device)
        probe += flat[idx].float().cpu().tolist()
    return {"arch": arch, "probe": probe}


def same_model(a: dict, b: dict) -> bool:
    if a["arch"] != b["arch"] or len(a["probe"]) != len(b["probe"]):
        return False
    return bool(np.allclose(a["probe"], b["probe"], rtol=1e-2, atol=1e-3))


def model_fingerprint(bundle) -> str:
    """A short display name for the identity: arch hash + hash of the probe rounded to 2 digits."""
    ident = model_identity(bundle)
    probe = hashlib.sha256(np.round(np.asarray(ident["probe"]), 2).tobytes()).hexdigest()[:8]
    return f"{ident['arch']}-{probe}"


@dataclass
class ConceptFile:
    concepts: ConceptSet
    masks: list  # per image: (K_i, H, W) bool
    weights: TunedWeights | None
    meta: dict

    @property
    def names(self) -> list[str]:
        return self.concepts.names


def save_concepts(state, bundle, path: str | Path) -> Path:
    """Writes the state's concepts, masks and weights, with the base model's fingerprint, to `path`."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"concepts file: {path} is a folder; give a file name ending in .safetensors")
    tensors = {"concepts.vectors": state.concepts.vectors.detach().float().cpu().contiguous()}
    for i, m in enumerate(state.masks):
        if m is not None:
            tensors[f"masks.{i}"] = torch.from_numpy(np.ascontiguousarray(m, dtype=np.uint8))
    if state.weights is not None:
        for k, v in state.weights.tensors.items():
            tensors[f"weights.{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": FORMAT, "names": state.concepts.names, "init_words": state.concepts.init_words,
        "base_model": {"fingerprint": model_fingerprint(bundle), "identity": model_identity(bundle),
                       "source": bundle.source,
                       "text_dim": embedding_width(bundle), "family": bundle.family,
                       "text_dims": [int(te.get_input_embeddings().weight.shape[1]) for te in bundle.text_encoders]},
        "weights": None if state.weights is None else state.weights.meta(),
        "learn_config": state.config.to_dict(), "finetune": state.finetune, "images": state.images,
        "history": state.history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = with_digest({"em_core": json.dumps(meta)}, tensors)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def load_concepts(path: str | Path, bundle=None, allow_other_model: bool = False) -> ConceptFile:
    """Reads a concept file and checks every tensor against its header (and the digest, where the
    file has one); with `bundle` (the base model), checks it was learned on that model, and whatever
    `allow_other_model` says, that its vectors and weights fit that model's shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concepts: {path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(header.get("em_core", "null"))
    except Exception as exc:  # safetensors' own errors, the system's, JSON's: each named for what it is
        raise read_failure("concepts", path, exc, "save the concepts again") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"concepts: {path} is not an em_core concept file ({FORMAT})")
    again = "save the concepts again"
    check_digest("concepts", path, header, tensors, again)
    check = Checker("concepts", path, again)
    try:
        _check_file(check, meta, tensors, bundle)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a header missing a field
        raise BadFile(f"concepts: {path}: header: missing or malformed field ({exc!r}); {again}") from exc
    if bundle is not None and not allow_other_model:
        want, have = meta["base_model"]["fingerprint"], model_fingerprint(bundle)
        if not same_model(meta["base_model"]["identity"], model_identity(bundle)):
            raise ValueError(
                f"concepts: {path.name} was learned on another base model (fingerprint {want}, source "
                f"{meta['base_model']['source']!r}); this model's fingerprint is {have}. Load the model it was "
                "learned on, or pass allow_other_model / --allow-other-model to use it anyway")
    concepts = ConceptSet(meta["names"], meta["init_words"], tensors["concepts.vectors"])
    masks = [tensors[f"masks.{i}"].numpy().astype(bool) if f"masks.{i}" in tensors else None
             for i in range(len(meta.get("images") or []))]
    weights = None
    if meta.get("weights"):
        w = meta["weights"]
        wt = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
        weights = TunedWeights(w["kind"], wt, w.get("rank"), w.get("alpha"))
    return ConceptFile(concepts, masks, weights, meta)


def _check_file(check: Checker, meta: dict, tensors: dict, bundle) -> None:
    """The concept file's header and tensors, and with `bundle`, their fit to that base model."""
    names = check.names("names", meta["names"])
    if not names:
        check.fail("header 'names'", "no concepts")
    init = meta.get("init_words")
    if not isinstance(init, dict) or not all(isinstance(v, (str, type(None))) for v in init.values()):
        check.fail("header 'init_words'", "not a {name: word or null} record")
    family = meta["base_model"].get("family", "sd")  # concept files from before SDXL: SD 1.x / 2.x
    if family not in FAMILY_NAMES:
        check.fail("header 'base_model'.family", f"{family!r}, expected one of {', '.join(FAMILY_NAMES)}")
    if bundle is not None and family != bundle.family:
        raise BadFile(f"concepts: {Path(check.path).name} was learned on a "
                      f"{FAMILY_NAMES[family]} model, and this model ({bundle.source}) is {FAMILY_NAMES[bundle.family]}"
                      f": concepts work only on the family they were learned on (their tokens live in its text "
                      f"encoders), even with --allow-other-model / allow_other_model. Load a "
                      f"{'SDXL' if family == 'sdxl' else 'SD 1.x / 2.x'} model")
    dim = meta["base_model"].get("text_dim")
    if dim is not None and not (isinstance(dim, int) and dim > 0):
        check.fail("header 'base_model'.text_dim", f"{dim!r} is not a width")
    vec = check.tensor(tensors, "concepts.vectors", ndim=2)
    if vec.shape[0] != len(names):
        check.fail("tensor 'concepts.vectors'", f"{vec.shape[0]} vectors for {len(names)} names "
                                                f"({', '.join(names)}); there must be one name per vector")
    if dim is not None and vec.shape[1] != dim:
        check.fail("tensor 'concepts.vectors'", f"{vec.shape[1]} wide, but the header's text_dim is {dim}")
    dims = meta["base_model"].get("text_dims")
    if dims is not None and not (isinstance(dims, list) and len(dims) == (2 if family == "sdxl" else 1)
                                 and all(isinstance(d, int) and d > 0 for d in dims) and sum(dims) == vec.shape[1]):
        check.fail("header 'base_model'.text_dims", f"{dims!r} is not the widths of the {family} model's "
                                                    f"text encoder(s), adding up to the vectors' {vec.shape[1]}")
    if bundle is not None and vec.shape[1] != embedding_width(bundle):
        check.fail("tensor 'concepts.vectors'",
                   f"{vec.shape[1]} wide, but this model ({bundle.source}) embeds tokens in {embedding_width(bundle)} "
                   "dimensions: concept vectors work only on a model of their own width, even with "
                   "--allow-other-model / allow_other_model")
    images = check.images(meta.get("images") or [], names)
    check.masks(tensors, "masks", images)
    expected = {"concepts.vectors"} | {f"masks.{i}" for i in range(len(images))}
    for key in tensors:
        if key not in expected and not key.startswith("weights."):
            check.fail(f"tensor {key!r}", "not part of a concept file")
    if meta.get("weights"):
        check.weights(tensors, meta["weights"], bundle, prefix="weights.")
    elif any(k.startswith("weights.") for k in tensors):
        check.fail("header 'weights'", "null, but the file holds weights")


def state_from_concepts(cb: ConceptFile):
    """A LearnState holding a loaded concept file's concepts, masks, weights and history (status
    'loaded'), for generating or exporting; learning further needs the images, which it lacks."""
    from .config import LearnConfig
    from .state import LearnState

    meta = cb.meta
    return LearnState(concepts=cb.concepts, images=meta.get("images") or [],
                      config=LearnConfig.from_dict(meta.get("learn_config") or {}), masks=list(cb.masks),
                      fixed=[[] for _ in cb.masks], history=meta.get("history") or {"steps": [], "refreshes": []},
                      weights=cb.weights, finetune=meta.get("finetune"), status="loaded",
                      model=meta["base_model"]["source"])


def save_run(state, bundle, out: str | Path) -> None:
    """A run's files: the resumable state and, beside it, OUT/concepts.safetensors; under the run
    folder's lock (refused while another process holds it)."""
    from .runlock import run_lock
    from .state import save_state

    with run_lock(out):
        save_state(state, out)
        save_concepts(state, bundle, Path(out) / "concepts.safetensors")
