"""ComfyUI entry point of the Concept EM node pack."""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # so the nodes can import em_core, which ships beside them
    sys.path.insert(0, _here)

# ComfyUI imports this folder as a package. pytest imports this file too (the checkout's root is a
# package to it), as a bare module when the folder's name is not an identifier (e.g. a clone in
# "concept-em"); then the relative import has no parent, and `nodes` is found through sys.path.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
    from .nodes.host import register_folders  # noqa: E402
else:
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
    from nodes.host import register_folders  # noqa: E402

register_folders()
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
