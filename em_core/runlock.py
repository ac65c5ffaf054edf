"""One writer per run folder: OUT/.em_core.lock holds the owner's pid.

Two `learn` (or `finetune`) processes on one folder used to both run, and one silently overwrote
the other's files (a late starter even resumed the other's run). Whoever writes a run folder
holds its lock: a second writer is refused with the owner's pid. A lock whose owner is gone (the
process was killed) is stale and taken over, with a note. On POSIX the lock is an flock on the
file, which the system drops when its process dies, whatever way it dies; elsewhere the pid in
the file is checked for a live process.

Taking the lock also removes the temp files (.NAME.xxxx.tmp) that a save killed mid-write left
beside the run's files: with the lock held, no other writer's temp file can be among them.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".em_core.lock"
# The temp names write_atomic gives (mkstemp: ".NAME." + 8 random characters + ".tmp") of the
# files a run folder holds; other temp files are left alone.
RUN_FILES = ("state.safetensors", "state.json", "history.json", "weights.safetensors", "concepts.safetensors",
             "finetune_optimizer.safetensors")
TMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{6,}\.tmp$")

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_held: dict = {}  # resolved folder -> [file descriptor or None, depth]
_guard = threading.Lock()


class RunLocked(RuntimeError):
    """Another live process writes this run folder."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    bits = [f"pid {owner.get('pid', '?')}"]
    if owner.get("host") and owner["host"] != socket.gethostname():
        bits.append(f"on {owner['host']}")
    if owner.get("started"):
        bits.append(f"since {owner['started']}")
    if owner.get("command"):
        bits.append(f"running {owner['command']!r}")
    return ", ".join(bits)


def _refuse(folder: Path, owner: dict):
    raise RunLocked(f"out: {folder} is in use by another process ({_describe(owner)}); wait for it to end, or give "
                    f"another folder. If no such process runs, delete {folder / LOCK_NAME}")


def _stamp() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}).encode()


def _note_stale(folder: Path, owner: dict) -> None:
    if owner.get("pid") not in (None, os.getpid()):
        print(f"note: {folder}: took over the lock of pid {owner['pid']}, which no longer runs", file=sys.stderr)


def _acquire_flock(folder: Path):
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            _refuse(folder, _read_owner(path))
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its owner removed the file while we opened it: try the new one
            os.close(fd)
            continue
        _note_stale(folder, _read_owner(path))  # we hold the flock: whoever wrote the file has let go
        os.ftruncate(fd, 0)
        os.pwrite(fd, _stamp(), 0)
        return fd


def _acquire_pidfile(folder: Path):
    path = folder / LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if owner.get("pid") is None or _alive(owner["pid"]):
                _refuse(folder, owner)
            _note_stale(folder, owner)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        os.write(fd, _stamp())
        os.close(fd)
        return None
    _refuse(folder, _read_owner(path))


def clean_temp_files(folder: Path) -> list[Path]:
    """Removes the temp files a killed save left beside the run's files (and its mask PNGs)."""
    removed = []
    for where, names in ((folder, RUN_FILES), (folder / "masks", None)):
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for e in entries:
            m = TMP_RE.match(e.name)
            if not m or not e.is_file(follow_symlinks=False):
                continue
            if names is None and not m["name"].endswith(".png") or names is not None and m["name"] not in names:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def run_lock(folder: str | Path):
    """Holds FOLDER's lock for the block (re-entrant within a process); refuses with RunLocked when
    another process holds it. On first taking it, removes temp files left by a killed save."""
    folder = Path(folder).resolve()
    key = str(folder)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            folder.mkdir(parents=True, exist_ok=True)
            fd = _acquire_flock(folder) if fcntl is not None else _acquire_pidfile(folder)
            _held[key] = entry = [fd, 1]
            removed = clean_temp_files(folder)
            if removed:
                print(f"note: {folder}: removed {len(removed)} temp file(s) an interrupted save left "
                      f"({', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''})",
                      file=sys.stderr)
    try:
        yield folder
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / LOCK_NAME)  # while still holding it: a waiter re-checks the inode
                if entry[0] is not None:
                    os.close(entry[0])


def holds(folder: str | Path) -> bool:
    return str(Path(folder).resolve()) in _held


_kept = contextlib.ExitStack()


def hold(folder: str | Path) -> Path:
    """Takes FOLDER's lock until `release_held()` (the CLI's commands hold their run folder for the
    whole command, from before the state is read to after the last save)."""
    return _kept.enter_context(run_lock(folder))


def release_held() -> None:
    _kept.close()


atexit.register(release_held)
