"""ComfyUI node classes: thin wrappers over em_core (the only package here that talks to ComfyUI)."""
from ._engine import load_engine

load_engine()  # em_core from this pack's own folder, before any node module imports it
from .learn_nodes import AttentionMaskInit, DenseCRFRefine, EMTokenStep, JointFinetune
from .model_nodes import ConceptModelFromCheckpoint, ConceptModelLoader
from .output_nodes import (ApplyConceptsToModel, ConceptGenerate, ConceptTextEncode, ExportConceptsForComfy,
                           LoadConcepts, MaskOverlayPreview, SaveConcepts)
from .world_nodes import TinyWorldScene

# Each node once: its type name (what saved workflows refer to, never to change), class and title.
# The concept-file nodes keep their old type names (ConceptEM_SaveBundle / _LoadBundle): titles changed,
# saved workflows still load. "Bundle" in the titles meant the concept file; it now names the base model only.
NODES = [
    ("ConceptEM_ModelFromCheckpoint", ConceptModelFromCheckpoint, "Concept EM Model (from checkpoint)"),
    ("ConceptEM_ModelLoader", ConceptModelLoader, "Concept EM Model Loader"),
    ("ConceptEM_AttentionMaskInit", AttentionMaskInit, "Attention Mask Init"),
    ("ConceptEM_DenseCRFRefine", DenseCRFRefine, "DenseCRF Refine"),
    ("ConceptEM_EMTokenStep", EMTokenStep, "EM Token Step"),
    ("ConceptEM_JointFinetune", JointFinetune, "Joint Finetune"),
    ("ConceptEM_Generate", ConceptGenerate, "Concept Generate"),
    ("ConceptEM_SaveBundle", SaveConcepts, "Save Concepts"),
    ("ConceptEM_LoadBundle", LoadConcepts, "Load Concepts"),
    ("ConceptEM_Export", ExportConceptsForComfy, "Export Concepts (embeddings + LoRA)"),
    ("ConceptEM_MaskOverlay", MaskOverlayPreview, "Mask Overlay Preview"),
    ("ConceptEM_ApplyToModel", ApplyConceptsToModel, "Apply Concepts To Model"),
    ("ConceptEM_TextEncode", ConceptTextEncode, "Concept Text Encode"),
    ("ConceptEM_TinyWorldScene", TinyWorldScene, "Tiny World Scene"),
]
NODE_CLASS_MAPPINGS = {name: cls for name, cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {name: title for name, _, title in NODES}
