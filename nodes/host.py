"""What the nodes need from ComfyUI, with plain fallbacks so the nodes also run without it
(tests, scripts). The only module that imports comfy, server or folder_paths."""
from __future__ import annotations

import os
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
    """A `concepts` model folder (models/concepts) for saved bundles, as ComfyUI registers its own."""
    if _fp is None:
        return
    path = os.path.join(_fp.models_dir, CONCEPTS_FOLDER)
    if CONCEPTS_FOLDER not in _fp.folder_names_and_paths:
        _fp.folder_names_and_paths[CONCEPTS_FOLDER] = ([path], {".safetensors"})


def folder(kind: str, fallback: Path) -> Path:
    """The first folder ComfyUI has for `kind` (concepts, embeddings, loras), else `fallback`."""
    if _fp is not None:
        try:
            return Path(_fp.get_folder_paths(kind)[0])
        except (KeyError, IndexError):
            pass
    return Path(fallback)


def folders(kind: str, fallback: Path) -> list[Path]:
    """Every folder ComfyUI has for `kind` (models/diffusers and any extra_model_paths), else `fallback`."""
    if _fp is not None:
        try:
            return [Path(p) for p in _fp.get_folder_paths(kind)]
        except KeyError:
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
    if _fp is not None:
        try:
            return sorted(_fp.get_filename_list(kind))
        except KeyError:
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


def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI."""
    return bool(_mm is not None and _mm.processing_interrupted())


class Progress:
    """ComfyUI's progress bar on the node, or nothing."""

    def __init__(self, total: int, node_id: str | None = None):
        self.bar = _cu.ProgressBar(total, node_id=node_id) if _cu is not None and total > 0 else None

    def update(self, done: int, total: int, preview=None) -> None:
        if self.bar is not None:
            self.bar.update_absolute(done, total, preview)


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
