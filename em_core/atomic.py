"""Atomic writes confined to one output folder."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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


class WriteError(OSError):
    """A file or folder that could not be written (full disk, read-only file system, no permission),
    with a message that names it; the file's previous version, if any, is kept."""

    def __init__(self, err: int | None, message: str):
        super().__init__(message)  # str() is the message alone, with no "[Errno N]" before it
        self.errno = err


# safetensors' own error type wraps the system's: "... I/O error: ... (os error 28)" from 0.6,
# "... IoError(Os { code: 28, kind: StorageFull, ... })" up to 0.5 (the declared floor is 0.4.3).
_WRAPPED_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def _wrapped_errno(exc: BaseException) -> int | None:
    m = _WRAPPED_OS_ERROR.search(str(exc))
    return int(m.group(1) or m.group(2)) if m else None


def _reason(exc: BaseException) -> str:
    err = getattr(exc, "errno", None)
    if err is None:
        err = _wrapped_errno(exc)
    if err is not None:
        return f"{os.strerror(err)}" + {errno.ENOSPC: ": the disk is full", errno.EDQUOT: ": the disk quota is used up",
                                         errno.EROFS: ": the folder is on a read-only file system"}.get(err, "")
    return str(exc)


def prepare_out(root: str | Path) -> Path:
    """The output folder, made if needed; refused now, before any work, if it cannot be written."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"out: {root} exists and is a file; give a folder path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            raise NotADirectoryError(f"out: {root} cannot be made, a part of its path is a file ({exc})") from exc
        raise WriteError(getattr(exc, "errno", None) or errno.EIO,
                         f"out: cannot make the folder {root} ({_reason(exc)}); give another folder") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        reason = os.strerror(errno.EACCES)
        try:  # tell a read-only file system from a permission
            if os.statvfs(root).f_flag & os.ST_RDONLY:
                reason = _reason(OSError(errno.EROFS, ""))
        except (OSError, AttributeError):
            pass
        raise WriteError(errno.EACCES, f"out: cannot write in {root} ({reason}); give another folder")
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise
    except OSError as exc:
        raise WriteError(exc.errno or errno.EIO, f"cannot write {path} ({_reason(exc)})") from exc
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, (WriteError, FileNotFoundError, IsADirectoryError,
                                                              NotADirectoryError)) \
                or type(exc).__name__ == "SafetensorError" and _wrapped_errno(exc) is not None:
            kept = "; its previous version is kept" if path.exists() else ""
            raise WriteError(getattr(exc, "errno", None) or _wrapped_errno(exc) or errno.EIO,
                             f"cannot write {path} ({_reason(exc)}){kept}") from exc
        raise


def write_json(path: Path, data) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)

    write_atomic(path, w)
