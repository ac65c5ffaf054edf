"""Atomic writes confined to one output folder."""
from __future__ import annotations

import json
import os
import stat
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


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (another thread
    creating a file meanwhile would otherwise get the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(path: Path) -> int:
    """The mode a plain open(path, "w") would leave: an existing file's own, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def write_atomic(path: Path, writer) -> None:
    """Calls writer(tmp_path) for a temp file beside `path`, then renames it over `path`. The file
    ends with the mode a plain write would give it (mkstemp's temp files are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, file_mode(path))
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
