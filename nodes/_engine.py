"""Makes `em_core` importable for the node modules without putting the pack on sys.path.

Inside ComfyUI the pack is a package with a path-made name and its root is on no search path, so
`import em_core` would fail (or find some other copy). This loads the pack's own em_core, from its
folder beside nodes/, under the name `em_core`; its submodules then come from that folder too.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ENGINE = "em_core"
ENGINE_DIR = Path(__file__).resolve().parents[1] / ENGINE


def _origin(module) -> Path | None:
    f = getattr(module, "__file__", None)
    return Path(f).resolve().parent if f else None


def load_engine():
    """The pack's own em_core module, loaded by path once; refuses a different em_core already loaded."""
    loaded = sys.modules.get(ENGINE)
    if loaded is not None:
        if _origin(loaded) == ENGINE_DIR:
            return loaded
        raise ImportError(f"another {ENGINE} ({getattr(loaded, '__file__', loaded)}) is already imported; this "
                          f"node pack needs its own, {ENGINE_DIR} (uninstall the other copy or update both)")
    spec = importlib.util.spec_from_file_location(ENGINE, ENGINE_DIR / "__init__.py",
                                                  submodule_search_locations=[str(ENGINE_DIR)])
    if spec is None or spec.loader is None:
        raise ImportError(f"{ENGINE}: cannot load {ENGINE_DIR}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[ENGINE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == ENGINE or n.startswith(ENGINE + ".")]:
            del sys.modules[name]
        raise
    return module
