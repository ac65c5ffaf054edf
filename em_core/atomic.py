"""Atomic writes confined to one output folder."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def inside(root: str | Path, relative: str | Path) -> Path:
    """`root/relative`, refusing anything that would land outside `root`."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"refusing {relative!r}: it resolves outside {root}; give a plain file name")
    return target


def prepare_out(root: str | Path) -> Path:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"out: {root} exists and is a file; give a folder path")
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def write_atomic(path: Path, writer) -> None:
    """Calls writer(tmp_path) for a temp file beside `path`, then renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)

    write_atomic(path, w)
