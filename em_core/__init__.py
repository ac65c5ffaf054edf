"""em_core: learn several visual concepts from a few images with no hand-drawn masks.

Cross-attention masks refined by DenseCRF and improved in an EM-like loop with the concept
tokens (Rahman et al., "Visual Concept-driven Image Generation with Text-to-Image Diffusion
Model"), then a joint fine-tune, generation and export. Torch + diffusers + transformers;
never imports ComfyUI.
"""
from .concept_file import load_concepts, save_concepts
from .concepts import ConceptSet, concept_names, injected
from .config import LearnConfig
from .crf import CRFParams, refine_masks
from .dataset import TrainImage, prepare_image
from .em_loop import learn, start_state
from .export import export_concepts
from .finetune import FinetuneConfig, finetune
from .generate import generate
from .model_io import ModelBundle, load_bundle
from .state import LearnState, load_state, save_state
from .weights import TunedWeights, applied

__all__ = [
    "ConceptSet", "concept_names", "injected", "LearnConfig", "CRFParams", "refine_masks", "TrainImage",
    "prepare_image", "learn", "start_state", "ModelBundle", "load_bundle", "LearnState", "load_state", "save_state",
    "FinetuneConfig", "finetune", "generate", "save_concepts", "load_concepts", "export_concepts", "TunedWeights",
    "applied",
]
__version__ = "0.1.0"
