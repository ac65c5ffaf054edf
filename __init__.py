"""ComfyUI entry point of the Concept EM node pack.

ComfyUI imports this folder as a package (importlib, under a name made from its path), so the
nodes come in by a relative import, and nodes/__init__.py loads the engine (em_core, beside them)
from this folder by its path. Nothing is put on sys.path: the pack's `nodes`, `tools`, `tests` and
`benchmarks` never shadow ComfyUI's own modules or another pack's.
"""
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.host import register_folders
else:  # imported as a bare module (a tool or test runner with this folder on its path), never by ComfyUI
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from nodes.host import register_folders

register_folders()
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
