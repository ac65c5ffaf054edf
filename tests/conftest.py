"""Shared fixtures: a tiny random model on disk, procedural scenes, the real photographs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from em_core.model_io import load_bundle
from em_core.tiny_world.scenes import make_scene
from em_core.tiny_world.tiny_model import make_tiny_model

SHARED_SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def bundle(tiny_dir):
    """A freshly loaded tiny model per test, so added tokens never leak between tests."""
    return load_bundle(tiny_dir)


@pytest.fixture(scope="session")
def scene_files(tmp_path_factory):
    """Two 64 px scenes with a red circle [v1], a blue square [v2] on grass [v3], true masks beside."""
    root = tmp_path_factory.mktemp("scenes")
    out = []
    for i in range(2):
        s = make_scene(seed=10 + i)
        path = root / f"scene{i}.png"
        s.image.save(path)
        truth = {"[v1]": s.masks["red circle"], "[v2]": s.masks["blue square"], "[v3]": s.masks["grass"]}
        for name, m in truth.items():
            from PIL import Image

            Image.fromarray(m.astype(np.uint8) * 255).save(root / f"scene{i}_{name[1:-1]}.png")
        out.append((path, truth))
    return out


@pytest.fixture(scope="session")
def sd15_model():
    """One SD-1.5-shaped random model for the tests where real shapes and key names matter (its
    random init alone takes ~14 s); tests only read it: learning keeps its vectors in the state."""
    import torch

    from em_core.tiny_world.tiny_model import build_model

    torch.set_num_threads(2)
    return build_model("sd15", seed=0)


def real_scenes():
    if not SHARED_SCENES.is_dir():
        return []
    return sorted(p for p in SHARED_SCENES.iterdir() if (p / "img.jpg").is_file())


@pytest.fixture
def images(scene_files):
    """The two scenes as a ComfyUI IMAGE batch."""
    from PIL import Image

    from nodes.convert import pil_to_images

    return pil_to_images([Image.open(p) for p, _ in scene_files])


@pytest.fixture
def node_start(bundle, images):
    """Attention Mask Init's (concepts, masks) on the two scenes, as the node tests start from."""
    from nodes.learn_nodes import AttentionMaskInit

    return AttentionMaskInit().run(bundle, images, "a photo of [v1] and [v2] on [v3]\n[v1] on [v3]",
                                   "[v1]=red", 4, 0.5, 0, 0, 0)


def exported_lora_names(weights, known: set) -> dict:
    """The kohya module names an export of `weights` writes, each checked to carry exactly
    lora_down / lora_up / alpha and to be one ComfyUI's key map `known` accepts."""
    from em_core.export import lora_state_dict

    tensors, skipped = lora_state_dict(weights, rank=1)
    names = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        names.setdefault(name, set()).add(suffix)
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in names.values())
    unknown = sorted(n for n in names if n not in known)
    assert not unknown, unknown[:5]
    return {"names": set(names), "skipped": skipped}


def peft_lora_tensors(modules: dict) -> dict:
    """The rank-1 adapters peft puts on each module's targets, as the fine-tune makes them
    (zero stand-in tensors, shapes from meta-device modules)."""
    import torch
    from peft.functional import get_peft_model_state_dict

    from em_core.weights import ADAPTER, lora_injected

    out = {}
    for comp, module in modules.items():
        with torch.device("meta"), lora_injected(module, comp, 1):
            sd = get_peft_model_state_dict(module, adapter_name=ADAPTER)
        out.update({f"{comp}.{k}": torch.zeros(v.shape) for k, v in sd.items()})
    return out
