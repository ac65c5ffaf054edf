"""ComfyUI node classes: thin wrappers over em_core (the only package here that talks to ComfyUI)."""
from ._engine import load_engine

load_engine()  # em_core from this pack's own folder, before any node module imports it
from .learn_nodes import AttentionMaskInit, DenseCRFRefine, EMTokenStep, JointFinetune
from .model_nodes import ConceptModelFromCheckpoint, ConceptModelLoader
from .output_nodes import (ApplyConceptsToModel, ConceptGenerate, ConceptTextEncode, ExportConceptsForComfy,
                           LoadConceptBundle, MaskOverlayPreview, SaveConceptBundle)
from .world_nodes import TinyWorldScene

NODE_CLASS_MAPPINGS = {
    "ConceptEM_ModelFromCheckpoint": ConceptModelFromCheckpoint,
    "ConceptEM_ModelLoader": ConceptModelLoader,
    "ConceptEM_AttentionMaskInit": AttentionMaskInit,
    "ConceptEM_DenseCRFRefine": DenseCRFRefine,
    "ConceptEM_EMTokenStep": EMTokenStep,
    "ConceptEM_JointFinetune": JointFinetune,
    "ConceptEM_Generate": ConceptGenerate,
    "ConceptEM_SaveBundle": SaveConceptBundle,
    "ConceptEM_LoadBundle": LoadConceptBundle,
    "ConceptEM_Export": ExportConceptsForComfy,
    "ConceptEM_MaskOverlay": MaskOverlayPreview,
    "ConceptEM_ApplyToModel": ApplyConceptsToModel,
    "ConceptEM_TextEncode": ConceptTextEncode,
    "ConceptEM_TinyWorldScene": TinyWorldScene,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptEM_ModelFromCheckpoint": "Concept EM Model (from checkpoint)",
    "ConceptEM_ModelLoader": "Concept EM Model Loader",
    "ConceptEM_AttentionMaskInit": "Attention Mask Init",
    "ConceptEM_DenseCRFRefine": "DenseCRF Refine",
    "ConceptEM_EMTokenStep": "EM Token Step",
    "ConceptEM_JointFinetune": "Joint Finetune",
    "ConceptEM_Generate": "Concept Generate",
    "ConceptEM_SaveBundle": "Save Concept Bundle",
    "ConceptEM_LoadBundle": "Load Concept Bundle",
    "ConceptEM_Export": "Export Concepts (embeddings + LoRA)",
    "ConceptEM_MaskOverlay": "Mask Overlay Preview",
    "ConceptEM_ApplyToModel": "Apply Concepts To Model",
    "ConceptEM_TextEncode": "Concept Text Encode",
    "ConceptEM_TinyWorldScene": "Tiny World Scene",
}
