"""What the nodes need from ComfyUI, with plain fallbacks so the nodes also run without it
(tests, scripts). The only module that imports comfy, server or folder_paths."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

try:  # inside ComfyUI
    import comfy.model_management as _mm
    import comfy.utils as _cu
    import folder_paths as _fp
except ImportError:  # plain Python
    _mm = _cu = _fp = None

CONCEPTS_FOLDER = "concepts"


def in_comfy() -> bool:
    return _fp is not None


def register_folders() -> None:
    """A `concepts` model folder (models/concepts) for saved concept files, as ComfyUI registers its own."""
    if _fp is None:
        return
    path = os.path.join(_fp.models_dir, CONCEPTS_FOLDER)
    if CONCEPTS_FOLDER not in _fp.folder_names_and_paths:
        _fp.folder_names_and_paths[CONCEPTS_FOLDER] = ([path], {".safetensors"})


def _no_kind(kind: str) -> str:
    return f"ComfyUI has no {kind!r} folder type (folder_paths knows no such name)"


def folder(kind: str, fallback: Path) -> Path:
    """The first folder ComfyUI has for `kind` (concepts, embeddings, loras); outside ComfyUI,
    `fallback`. Inside ComfyUI a kind it lacks is refused: a folder guessed relative to the working
    directory is not where ComfyUI would look for the file."""
    if _fp is None:
        return Path(fallback)
    try:
        paths = _fp.get_folder_paths(kind)
    except KeyError:
        cause = _no_kind(kind)
    else:
        if paths:
            return Path(paths[0])
        cause = f"ComfyUI has no folder registered for {kind!r}"
    raise LookupError(f"{cause}; add one under {kind}: in extra_model_paths.yaml, or restart ComfyUI so it "
                      f"registers models/{kind}")


def folders(kind: str, fallback: Path) -> list[Path]:
    """Every folder ComfyUI has for `kind` (models/diffusers and any extra_model_paths); outside
    ComfyUI, `fallback`. A kind ComfyUI lacks gives none, with a warning saying so."""
    if _fp is not None:
        try:
            return [Path(p) for p in _fp.get_folder_paths(kind)]
        except KeyError:
            warnings.warn(f"{_no_kind(kind)}: no {kind} models are listed", stacklevel=2)
            return []
    return [Path(fallback)]


MODEL_INDEX = "model_index.json"


def list_diffusers(fallback: Path) -> list[str]:
    """The diffusers-format model folders (those holding a model_index.json) under every `diffusers`
    path, as paths relative to it, like core's DiffusersLoader lists them. get_filename_list cannot:
    ComfyUI registers the kind with the extension "folder", which matches no file."""
    found = set()
    for root in folders("diffusers", fallback):
        if not root.is_dir():
            continue
        for here, subdirs, files in os.walk(root, followlinks=True):
            if MODEL_INDEX in files:
                found.add(Path(os.path.relpath(here, root)).as_posix())
                subdirs[:] = []  # a model's own subfolders (unet, vae, ...) hold no other model
            else:
                subdirs.sort()
    return sorted(found)


def find_diffusers(name: str, fallback: Path) -> Path:
    """The folder a name from list_diffusers stands for: the first `diffusers` path holding it."""
    rel = Path(os.path.normpath(name))
    if rel.is_absolute() or rel.parts[:1] == ("..",):  # checked by name: a linked-in model may live elsewhere
        raise ValueError(f"model_name: {name!r} points outside the diffusers folders; pick a name from the list")
    searched = []
    for root in folders("diffusers", fallback):
        searched.append(str(root))
        if (root / rel / MODEL_INDEX).is_file():
            return root / rel
    raise FileNotFoundError(f"model_name: no diffusers model folder {name!r} (with a {MODEL_INDEX}) under "
                            f"{', '.join(searched) or 'any diffusers path'}")


def list_files(kind: str, fallback: Path) -> list[str]:
    """The .safetensors files ComfyUI lists for `kind`; outside ComfyUI, those in `fallback`. A kind
    ComfyUI lacks lists none, with a warning saying so."""
    if _fp is not None:
        try:
            return sorted(_fp.get_filename_list(kind))
        except KeyError:
            warnings.warn(f"{_no_kind(kind)}: no {kind} files are listed", stacklevel=2)
            return []
    root = Path(fallback)
    return sorted(p.name for p in root.glob("*.safetensors")) if root.is_dir() else []


def trains(fn):
    """ComfyUI runs nodes under torch.inference_mode(); a node that learns (or makes tensors that
    learning will use) leaves it explicitly for its whole body."""
    import functools

    import torch

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return run


class Cancelled(Exception):
    """Plain Python's stand-in for ComfyUI's InterruptProcessingException."""


def raise_cancelled() -> None:
    """Ends a cancelled node the way ComfyUI's own nodes do, so its output is not cached as done."""
    if _mm is not None:
        raise _mm.InterruptProcessingException()
    raise Cancelled("cancelled")


def resume_root() -> Path:
    """Where learning nodes keep the checkpoints a re-queue resumes from: ComfyUI's temp folder
    (emptied when ComfyUI starts), else the system's."""
    import tempfile

    base = _fp.get_temp_directory() if _fp is not None else tempfile.gettempdir()
    return Path(base) / "concept_em_resume"


def torch_device():
    """The device ComfyUI computes on (its --cpu, --directml, MPS, XPU... choices included), else the
    first CUDA GPU, else the CPU."""
    import torch

    if _mm is not None:
        return _mm.get_torch_device()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def free_memory(bytes_needed: float, device) -> None:
    """Ask ComfyUI to unload its own models from `device` until `bytes_needed` are free (outside
    ComfyUI there is nothing else to unload)."""
    if _mm is not None:
        _mm.free_memory(bytes_needed, device)


def unload_all_models() -> None:
    """ComfyUI's loaded models (checkpoints, CLIP, VAE, ControlNets...) leave the GPU for their offload
    device, so a learning node has the memory to itself; ComfyUI loads them back when a later node
    needs them."""
    if _mm is not None:
        _mm.unload_all_models()


def soft_empty_cache() -> None:
    """Hand the memory torch keeps cached back to the device (ComfyUI's own call where it runs)."""
    if _mm is not None:
        _mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def owns_device(fn):
    """For a node that trains or samples with the engine's model, which ComfyUI does not manage: ComfyUI's
    models are unloaded before it runs, and the cache torch kept is emptied after it ends, however
    it ends (done, cancelled, failed)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        unload_all_models()
        try:
            return fn(*args, **kwargs)
        finally:
            soft_empty_cache()

    return run


def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI."""
    return bool(_mm is not None and _mm.processing_interrupted())


class Progress:
    """ComfyUI's progress bar on the node, or nothing."""

    def __init__(self, total: int, node_id: str | None = None):
        self.bar = _cu.ProgressBar(total, node_id=node_id) if _cu is not None and total > 0 else None

    def update(self, done: int, total: int, preview=None) -> None:
        """ComfyUI's progress hook raises its interruption when Cancel was pressed, and clears the flag
        as it does. Raised from inside a learning loop's step callback, that would skip the loop's own
        stop (which saves the checkpoint a re-queue resumes from), so Cancel is put back and left to
        the loop, which stops before its next step and then raises the interruption itself."""
        if self.bar is None:
            return
        try:
            self.bar.update_absolute(done, total, preview)
        except Exception as exc:
            if _mm is None or not isinstance(exc, _mm.InterruptProcessingException):
                raise
            _mm.interrupt_current_processing(True)


def current_node() -> str | None:
    """The id of the node ComfyUI is running now, where ComfyUI says (it has no id in plain Python)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return None if ctx is None else ctx.node_id


def send(event: str, data: dict) -> None:
    """A message to the front end (web/concept_em.js) through ComfyUI's PromptServer, to the browser
    that queued the running prompt only: never to every connected one (they may be other people's,
    and the live preview shows the user's images). A prompt queued with no client id gets none, as
    ComfyUI's own "executed" messages do."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = PromptServer.instance
    client = getattr(server, "client_id", None)
    if server is not None and client is not None:
        server.send_sync(event, data, client)
