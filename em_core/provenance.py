"""Where a measured figure came from: the command, the code and the machine.

Every results JSON we quote carries this block, so a reader (and tests/test_figures.py) can tell
which code produced a number and rerun it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> dict:
    """HEAD's hash and the tracked files that differ from it (uncommitted edits, anyone's)."""
    try:
        def git(*a):
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout

        return {"head": git("rev-parse", "HEAD").strip(),
                "modified": sorted(line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines())}
    except (OSError, subprocess.CalledProcessError):
        return {"head": "unknown", "modified": []}


def machine() -> dict:
    import numpy
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def command(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    head = Path(argv[0])
    try:
        head = head.resolve().relative_to(ROOT)
    except ValueError:
        pass
    prog = "python -m em_core" if head.name == "__main__.py" and head.parent.name == "em_core" else f"python {head.as_posix()}"
    return " ".join([prog, *argv[1:]])


_started: dict | None = None  # the code a run began on (`begin`)


def begin() -> dict:
    """Records the commit a run starts on. A run of an hour can see commits land before it writes
    its JSON; the figures are the code's it began with, so that is the commit `provenance` names."""
    global _started
    _started = commit()
    return _started


def provenance(config: dict | None = None, argv: list[str] | None = None) -> dict:
    """The block every quoted results JSON carries: command, commit, full configuration, machine.
    `commit` is the one the run began on (`begin`), else HEAD now; when HEAD moved while it ran,
    `commit_at_end` says where to."""
    now = commit()
    block = {"command": command(argv), "commit": _started or now, "config": config or {}, "machine": machine()}
    if _started is not None and _started != now:
        block["commit_at_end"] = now
    return block
