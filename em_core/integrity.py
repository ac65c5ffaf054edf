"""Checks on the tensors of a concept file or a run state before anything uses them.

A file that parses is not yet a file to trust: a crafted or damaged one may hold NaN vectors,
vectors of another width, more vectors than names, masks of another size, or weights of another
model. Every check here refuses with a `BadFile` (a ValueError) naming the file and the field.

Safetensors has no checksum, so the writers also store a digest of the tensors in the header
(`em_core.digest`: sha256 over each tensor's name, dtype, shape and bytes, in name order), and the
readers recompute it. Files written before the digest existed have none and are checked without it.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch

from .concepts import check_name

DIGEST_KEY = "em_core.digest"
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BadFile(ValueError):
    """A file that parsed but whose contents cannot be used; the message names file and field."""


def hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """One tensor's part of the digest: its name, dtype and shape, then its raw bytes."""
    t = t.detach()
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    if t.numel():
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(memoryview(raw))


def tensor_digest(tensors: dict) -> str:
    """'sha256:<hex>' over every tensor in name order: name, dtype, shape, then its raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        hash_tensor(h, name, tensors[name])
    return "sha256:" + h.hexdigest()


def with_digest(header: dict, tensors: dict) -> dict:
    """The header to write beside `tensors`, digest included."""
    return {**header, DIGEST_KEY: tensor_digest(tensors)}


def check_digest(what: str, path, header: dict, tensors: dict, again: str) -> None:
    stored = header.get(DIGEST_KEY)
    if stored is None:
        return  # written before digests: the other checks still apply
    have = tensor_digest(tensors)
    if have != stored:
        raise BadFile(f"{what}: {path}: the tensors do not match the digest in the header ({DIGEST_KEY} "
                      f"{stored[:19]}..., computed {have[:19]}...): the file was changed or damaged after it "
                      f"was written; {again}")


# safetensors' messages (0.4+ spell them out, older ones give the variant's name) by what they mean.
_SHORT = ("incomplete metadata", "not fully covered", "metadataincompletebuffer", "invalid header length",
          "invalidheaderlength", "invalid offset", "invalidoffset")
_NOT_SAFETENSORS = ("header too large", "headertoolarge", "header too small", "headertoosmall",
                    "invalid json in header", "invalidheaderdeserialization", "invalid header start",
                    "invalidheaderstart", "utf-8", "utf8", "invalidheader")


def read_failure(what: str, path, exc: BaseException, again: str) -> BaseException:
    """The error to raise for `path` failing to load with `exc`, saying what went wrong rather than
    calling every failure damage: a file the system would not read (permissions, I/O error) or
    memory running out is not a damaged file, and only damage gets `again` (what to do about it)."""
    import json

    if isinstance(exc, MemoryError):
        return MemoryError(f"{what}: not enough memory to read {path} ({str(exc) or 'MemoryError'})")
    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc) or type(exc).__name__
        return OSError(exc.errno, f"{what}: {path} could not be read ({type(exc).__name__}: {cause}); the file "
                                  "itself may be fine: check its permissions and the disk")
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    text = str(exc).lower()
    if isinstance(exc, json.JSONDecodeError):
        why = f"has header metadata that is not valid JSON ({exc}): damaged, or not written by em_core"
    elif size == 0:
        why = "is empty (0 bytes): an interrupted write or copy"
    elif any(k in text for k in _SHORT):
        why = (f"is truncated: its {size} bytes are fewer than its safetensors header describes "
               f"(an interrupted write, copy or download; {exc})")
    elif any(k in text for k in _NOT_SAFETENSORS):
        why = f"is not a safetensors file, or its header is damaged ({exc})"
    else:
        why = f"could not be read ({type(exc).__name__}: {exc})"
    return BadFile(f"{what}: {path} {why}; {again}")


class Checker:
    """Refusals for one file: `what` ('concepts', 'state'), its path, and what to do about it."""

    def __init__(self, what: str, path, again: str):
        self.what, self.path, self.again = what, path, again

    def fail(self, field: str, problem: str):
        raise BadFile(f"{self.what}: {self.path}: {field}: {problem}; {self.again}")

    def tensor(self, tensors: dict, key: str, dtypes=FLOATS, ndim: int | None = None, shape=None,
               finite: bool = True) -> torch.Tensor:
        if key not in tensors:
            self.fail(f"tensor {key!r}", "missing")
        t = tensors[key]
        if t.dtype not in dtypes:
            self.fail(f"tensor {key!r}", f"dtype {str(t.dtype).removeprefix('torch.')}, expected "
                                        + " or ".join(str(d).removeprefix("torch.") for d in dtypes))
        if ndim is not None and t.ndim != ndim:
            self.fail(f"tensor {key!r}", f"{t.ndim} dimensions {tuple(t.shape)}, expected {ndim}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            self.fail(f"tensor {key!r}", f"shape {tuple(t.shape)}, expected {tuple(shape)}")
        if finite and t.is_floating_point() and t.numel():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                self.fail(f"tensor {key!r}", f"{bad} of its {t.numel()} values are NaN or infinite")
        if t.dtype == torch.uint8 and t.numel() and int(t.max()) > 1:
            self.fail(f"tensor {key!r}", f"a mask holds values up to {int(t.max())}, expected 0 or 1")
        return t

    def names(self, field: str, names) -> list[str]:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self.fail(f"header {field!r}", "not a list of concept names")
        for n in names:
            try:
                check_name(n)
            except ValueError as exc:
                self.fail(f"header {field!r}", str(exc))
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            self.fail(f"header {field!r}", f"names {', '.join(dup)} more than once")
        return names

    def images(self, images, known: list[str]) -> list[dict]:
        if not isinstance(images, list):
            self.fail("header 'images'", "not a list")
        for i, rec in enumerate(images):
            if not isinstance(rec, dict):
                self.fail(f"header 'images'[{i}]", "not a record")
            names = self.names(f"images[{i}].names", rec.get("names"))
            unknown = [n for n in names if n not in known]
            if unknown:
                self.fail(f"header 'images'[{i}].names", f"{', '.join(unknown)} not among the concepts {known}")
            size = rec.get("size")
            if size is not None and not (isinstance(size, list) and len(size) == 2
                                         and all(isinstance(v, int) and v > 0 for v in size)):
                self.fail(f"header 'images'[{i}].size", f"{size!r} is not a (width, height) in pixels")
        return images

    def masks(self, tensors: dict, prefix: str, images: list[dict], dtypes=(torch.uint8, torch.bool),
              exact_size: bool = True) -> None:
        """`prefix.i` for image i: (K_i, H, W), H and W the image's working size (if `exact_size`)."""
        for key in tensors:
            if key.startswith(prefix + "."):
                rest = key[len(prefix) + 1:]
                if not rest.isdigit() or int(rest) >= len(images):
                    self.fail(f"tensor {key!r}", f"no such image: the header lists {len(images)}")
        for i, rec in enumerate(images):
            key = f"{prefix}.{i}"
            if key not in tensors:
                continue
            t = self.tensor(tensors, key, dtypes, ndim=3)
            k = len(rec["names"])
            want = (k, rec["size"][1], rec["size"][0]) if exact_size and rec.get("size") else None
            if t.shape[0] != k:
                self.fail(f"tensor {key!r}", f"{t.shape[0]} masks, but image {i + 1} shows {k} concept(s) "
                                            f"({', '.join(rec['names'])})")
            if want is not None and tuple(t.shape) != want:
                self.fail(f"tensor {key!r}", f"shape {tuple(t.shape)}, expected {want} (image {i + 1}'s "
                                            f"{rec['size'][0]}x{rec['size'][1]} working size)")

    def weights(self, tensors: dict, info, bundle=None, prefix: str = "") -> dict:
        """The fine-tuned weights (`prefix` + '<component>.<name>'), checked against their header
        and, with `bundle`, against the model's own parameters. Returns them without the prefix."""
        if not isinstance(info, dict) or info.get("kind") not in ("full", "lora"):
            self.fail("header 'weights'", f"kind {info.get('kind') if isinstance(info, dict) else info!r}, "
                                          "expected full or lora")
        out = {}
        for key in tensors:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name.split(".", 1)[0] not in ("unet", "text_encoder", "text_encoder_2") or "." not in name:
                self.fail(f"tensor {key!r}", "not a weight of the unet, the text_encoder or the text_encoder_2")
            out[name] = self.tensor(tensors, key)
        if not out:
            self.fail("header 'weights'", "names weights but the file holds none")
        rank = info.get("rank")
        if info["kind"] == "lora":
            if not isinstance(rank, int) or rank < 1:
                self.fail("header 'weights'.rank", f"{rank!r}, expected a LoRA rank of at least 1")
            alpha = info.get("alpha")
            if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
                self.fail("header 'weights'.alpha", f"{alpha!r} is not a finite number")
            for name, t in out.items():
                if name.endswith(".lora_A.weight"):
                    other = name[: -len(".lora_A.weight")] + ".lora_B.weight"
                    if t.ndim != 2 or t.shape[0] != rank:
                        self.fail(f"tensor {prefix + name!r}", f"shape {tuple(t.shape)}, expected (rank {rank}, inputs)")
                elif name.endswith(".lora_B.weight"):
                    other = name[: -len(".lora_B.weight")] + ".lora_A.weight"
                    if t.ndim != 2 or t.shape[1] != rank:
                        self.fail(f"tensor {prefix + name!r}", f"shape {tuple(t.shape)}, expected (outputs, rank {rank})")
                else:
                    self.fail(f"tensor {prefix + name!r}", "not a LoRA lora_A / lora_B weight")
                if other not in out:
                    self.fail(f"tensor {prefix + name!r}", f"its pair {prefix + other!r} is missing")
        if bundle is not None:
            self._weights_fit(out, info["kind"], bundle, prefix)
        return out

    def _weights_fit(self, weights: dict, kind: str, bundle, prefix: str) -> None:
        modules = {"unet": bundle.unet, **bundle.text_modules()}
        params = {c: dict(m.named_parameters()) for c, m in modules.items()}
        for name, t in weights.items():
            comp, rest = name.split(".", 1)
            where = f"tensor {prefix + name!r}"
            if comp not in modules:
                self.fail(where, f"this model has no {comp} (it is {bundle.family.upper()}): the weights are for "
                                 "another kind of model")
            if kind == "full":
                p = params[comp].get(rest)
                if p is None:
                    self.fail(where, f"this model's {comp} has no parameter {rest!r}: it is another model")
                if tuple(p.shape) != tuple(t.shape):
                    self.fail(where, f"shape {tuple(t.shape)}, but this model's {comp}.{rest} is {tuple(p.shape)}: "
                                     "it is another model")
                continue
            module_name = rest.rsplit(".", 2)[0]
            try:
                layer = modules[comp].get_submodule(module_name)
                w = layer.weight
            except AttributeError:
                self.fail(where, f"this model's {comp} has no layer {module_name!r}: it is another model")
            if w.ndim != 2:
                continue
            want = w.shape[1] if name.endswith(".lora_A.weight") else w.shape[0]
            have = t.shape[1] if name.endswith(".lora_A.weight") else t.shape[0]
            if have != want:
                self.fail(where, f"shape {tuple(t.shape)} does not fit this model's {comp}.{module_name} "
                                 f"{tuple(w.shape)}: it is another model")


def embedding_width(bundle) -> int:
    """A concept vector's width on this model: its text encoders' token widths added (SDXL: 768 + 1280)."""
    return sum(int(te.get_input_embeddings().weight.shape[1]) for te in bundle.text_encoders)


STATE_AGAIN = "rerun `learn` into a fresh folder (or restore the run folder from a backup)"


def check_state(path, header: dict, meta: dict, tensors: dict) -> None:
    """A run state's tensors against its own header: one name per vector, moments of the vectors'
    shape, masks, map sums and the mask history sized for each image's concepts, all finite."""
    check_digest("state", path, header, tensors, STATE_AGAIN)
    check = Checker("state", path, STATE_AGAIN)
    try:
        _check_state(check, meta, tensors)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a header missing a field
        raise BadFile(f"state: {path}: header: missing or malformed field ({exc!r}); {STATE_AGAIN}") from exc


def _check_state(check: Checker, meta: dict, tensors: dict) -> None:
    names = check.names("concepts", meta["concepts"])
    vec = check.tensor(tensors, "concepts.vectors", ndim=2)
    if vec.shape[0] != len(names):
        check.fail("tensor 'concepts.vectors'", f"{vec.shape[0]} vectors for {len(names)} names "
                                                f"({', '.join(names)}); there must be one name per vector")
    for key in ("optimizer.exp_avg", "optimizer.exp_avg_sq"):
        if key in tensors:
            t = check.tensor(tensors, key, shape=vec.shape)
            if key.endswith("_sq") and t.numel() and float(t.min()) < 0:
                check.fail(f"tensor {key!r}", "negative second moments")
    if ("optimizer.exp_avg" in tensors) != ("optimizer.exp_avg_sq" in tensors):
        check.fail("tensor 'optimizer.exp_avg_sq'", "one of the optimiser's two moments is missing")
    if "optimizer.exp_avg" in tensors and not isinstance(meta.get("optimizer_step"), int):
        check.fail("header 'optimizer_step'", f"{meta.get('optimizer_step')!r}, expected the optimiser's step count")
    run_from = meta.get("run_from", 0)  # states from before it existed have none: their run began at 0
    if not isinstance(run_from, int) or isinstance(run_from, bool) or run_from < 0:
        check.fail("header 'run_from'", f"{run_from!r}, expected the step count the run began at")
    images = check.images(meta["images"], names)
    n = len(images)
    check.masks(tensors, "masks", images)
    steps = meta["mask_history_steps"]
    if not isinstance(steps, list):
        check.fail("header 'mask_history_steps'", "not a list")
    expected = {"concepts.vectors", "optimizer.exp_avg", "optimizer.exp_avg_sq"}
    expected |= {f"{p}.{i}" for p in ("masks",) for i in range(n)}
    for r in range(len(steps)):  # the history keeps each refresh's maps at their own grid
        for i in range(n):
            key = f"mask_history.{r}.{i}"
            expected.add(key)
            if key in tensors:
                t = check.tensor(tensors, key, ndim=3)
                if t.shape[0] != len(images[i]["names"]):
                    check.fail(f"tensor {key!r}", f"{t.shape[0]} maps, but image {i + 1} shows "
                                                  f"{len(images[i]['names'])} concept(s)")
    for key in tensors:
        if key not in expected:
            check.fail(f"tensor {key!r}", "not part of a run state (or of another image or refresh than the "
                                          "header lists)")


def check_weights_file(path, header: dict, info, tensors: dict) -> dict:
    """A run's weights.safetensors: digest, then each tensor against the state's 'weights' header."""
    again = "delete it and the state's fine-tune, or rerun `finetune`"
    check_digest("state", path, header, tensors, again)
    return Checker("state", path, again).weights(tensors, info)


MOMENTS_AGAIN = "a resumed fine-tune starts AdamW afresh"


def check_moments_file(path, header: dict, info, tensors: dict) -> None:
    """A run's finetune_optimizer.safetensors: digest, then for each parameter its header lists an
    AdamW step count and both moments (float, one shape, finite, second moments not negative), and
    no other tensor. The file is optional, so its reader warns with the message instead of refusing."""
    check_digest("state", path, header, tensors, MOMENTS_AGAIN)
    check = Checker("state", path, MOMENTS_AGAIN)
    steps = info.get("adam_steps") if isinstance(info, dict) else None
    if not isinstance(steps, dict):
        check.fail("header 'adam_steps'", f"{steps!r} is not a {{parameter: AdamW step count}} record")
    if not isinstance(info.get("step"), int) or isinstance(info["step"], bool) or info["step"] < 0:
        check.fail("header 'step'", f"{info.get('step')!r}, expected the fine-tune step")
    for name, n in steps.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            check.fail(f"header 'adam_steps'[{name!r}]", f"{n!r}, expected an AdamW step count")
        avg = check.tensor(tensors, f"{name}.exp_avg")
        sq = check.tensor(tensors, f"{name}.exp_avg_sq", shape=avg.shape)
        if sq.numel() and float(sq.min()) < 0:
            check.fail(f"tensor {name + '.exp_avg_sq'!r}", "negative second moments")
    expected = {f"{n}.{k}" for n in steps for k in ("exp_avg", "exp_avg_sq")}
    for key in tensors:
        if key not in expected:
            check.fail(f"tensor {key!r}", "not a moment of a parameter the header lists")


def check_fits_model(state, bundle, where: str, what: str = "--model") -> None:
    """A loaded run state against the model it is about to go on with: the vectors' width and the
    fine-tuned weights' shapes must be the model's (a different model gave raw size-mismatch errors)."""
    width, have = embedding_width(bundle), int(state.concepts.vectors.shape[1])
    source = f" ({state.model})" if state.model else ""

    if width != have:
        raise BadFile(f"{what}: {bundle.source} embeds tokens in {width} dimensions, but the run in {where} was "
                      f"learned on a model{source} with {have}; go on with the model it was learned on")
    if state.weights is not None:
        check = Checker(what, bundle.source, f"go on with the model the run in {where} was learned on{source}")
        check._weights_fit(state.weights.tensors, state.weights.kind, bundle, "weights: ")
