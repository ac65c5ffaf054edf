"""Writes the shipped workflows (ComfyUI's UI format) from compact specs, using this pack's node
definitions and the core node definitions recorded from ComfyUI's source in
tests/data/comfyui_core_nodes.json, so every input name and widget order matches.

    python tools/make_workflows.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nodes as pack  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the front end adds a control_after_generate value after these


def node_specs() -> dict:
    core = json.loads((ROOT / "tests" / "data" / "comfyui_core_nodes.json").read_text())["nodes"]
    specs = {name: {"inputs": {**s.get("required", {}), **s.get("optional", {})}, "outputs": s["outputs"],
                    "output_names": s.get("output_names") or s["outputs"]} for name, s in core.items()}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        it = cls.INPUT_TYPES()
        inputs = {}
        for section in ("required", "optional"):
            for k, decl in it.get(section, {}).items():
                inputs[k] = "COMBO" if isinstance(decl[0], list) else decl[0]
        specs[name] = {"inputs": inputs, "outputs": list(cls.RETURN_TYPES),
                       "output_names": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    return specs


def defaults(cls_name: str) -> dict:
    cls = pack.NODE_CLASS_MAPPINGS.get(cls_name)
    if cls is None:
        return {}
    out = {}
    for section in ("required", "optional"):
        for k, decl in cls.INPUT_TYPES().get(section, {}).items():
            opts = decl[1] if len(decl) > 1 else {}
            if "default" in opts:
                out[k] = opts["default"]
            elif isinstance(decl[0], list) and decl[0]:
                out[k] = decl[0][0]
    return out


def build(spec_nodes: list[dict]) -> dict:
    specs = node_specs()
    by_id = {n["id"]: n for n in spec_nodes}
    links, ui_nodes = [], []
    out_links: dict = {}
    for n in spec_nodes:
        for inp, (src, out_name) in n.get("links", {}).items():
            s = specs[by_id[src]["type"]]
            slot = s["output_names"].index(out_name) if out_name in s["output_names"] else s["outputs"].index(out_name)
            link_id = len(links) + 1
            links.append([link_id, src, slot, n["id"], inp, s["outputs"][slot]])
            out_links.setdefault((src, slot), []).append(link_id)
    for order, n in enumerate(spec_nodes):
        s = specs[n["type"]]
        values = {**defaults(n["type"]), **n.get("widgets", {})}
        inputs, widgets = [], []
        for name, typ in s["inputs"].items():
            linked = name in n.get("links", {})
            link_id = next((lk[0] for lk in links if lk[3] == n["id"] and lk[4] == name), None)
            if typ in WIDGET_TYPES:
                widgets.append(values.get(name))
                if name in SEED_NAMES:
                    widgets.append("fixed")
                if n["type"] == "LoadImage" and name == "image":
                    widgets.append("image")  # the front end's upload widget
                if linked:
                    inputs.append({"name": name, "type": typ, "widget": {"name": name}, "link": link_id})
            else:
                inputs.append({"name": name, "type": typ, "link": link_id})
        outputs = [{"name": s["output_names"][i], "type": t, "links": out_links.get((n["id"], i), []),
                    "slot_index": i} for i, t in enumerate(s["outputs"])]
        ui_nodes.append({"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n.get("size", [320, 200]),
                         "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": n["type"]}, "widgets_values": widgets,
                         **({"title": n["title"]} if "title" in n else {})})
    ui_links = []
    for lk in links:
        target = by_id[lk[3]]
        names = [i for i in specs[target["type"]]["inputs"]]
        # the target slot is the input's index among the node's input sockets
        socket_names = [i["name"] for i in next(u for u in ui_nodes if u["id"] == lk[3])["inputs"]]
        ui_links.append([lk[0], lk[1], lk[2], lk[3], socket_names.index(lk[4]), lk[5]])
        assert lk[4] in names
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": ui_links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def learn_chain(model_id: int, image_link, prompt_widget: dict, steps: tuple, finetune_steps: int, first: int,
                width: int, extra_links: dict | None = None) -> list[dict]:
    """Mask init -> CRF -> two EM stages -> joint fine-tune -> generate, with mask previews."""
    i = first
    return [
        {"id": i, "type": "ConceptEM_AttentionMaskInit", "pos": [420, 40], "size": [360, 300],
         "links": {"em_model": (model_id, "em_model"), "images": image_link, **(extra_links or {})},
         "widgets": prompt_widget},
        {"id": i + 1, "type": "ConceptEM_DenseCRFRefine", "pos": [820, 40], "links": {"concepts": (i, "concepts")}},
        {"id": i + 2, "type": "ConceptEM_EMTokenStep", "pos": [1200, 40], "title": "EM stage 1",
         "links": {"em_model": (model_id, "em_model"), "concepts": (i + 1, "concepts")},
         "widgets": {"steps": steps[0], "refresh_every": max(1, steps[0] // 4)}},
        {"id": i + 3, "type": "ConceptEM_EMTokenStep", "pos": [1580, 40], "title": "EM stage 2 (lower lr)",
         "links": {"em_model": (model_id, "em_model"), "concepts": (i + 2, "concepts")},
         "widgets": {"steps": steps[1], "learning_rate": 2.5e-4, "refresh_every": max(1, steps[1] // 2)}},
        {"id": i + 4, "type": "ConceptEM_JointFinetune", "pos": [1960, 40],
         "links": {"em_model": (model_id, "em_model"), "concepts": (i + 3, "concepts")},
         "widgets": {"steps": finetune_steps, "mode": "lora"}},
        {"id": i + 5, "type": "ConceptEM_Generate", "pos": [2340, 40], "size": [360, 420],
         "links": {"em_model": (model_id, "em_model"), "concepts": (i + 4, "concepts")},
         "widgets": {"prompt": "a photo of [v1] and [v2] on [v3]", "width": width, "height": width,
                     "batch_size": 4}},
        {"id": i + 6, "type": "SaveImage", "pos": [2740, 40], "links": {"images": (i + 5, "IMAGE")},
         "widgets": {"filename_prefix": "concept_em"}},
        {"id": i + 7, "type": "ConceptEM_MaskOverlay", "pos": [820, 380],
         "links": {"image": image_link, "masks": (i + 1, "masks")}},
        {"id": i + 8, "type": "PreviewImage", "pos": [1200, 480], "title": "masks after DenseCRF",
         "links": {"images": (i + 7, "IMAGE")}},
        {"id": i + 9, "type": "ConceptEM_MaskOverlay", "pos": [1580, 380],
         "links": {"image": image_link, "masks": (i + 3, "masks")}},
        {"id": i + 10, "type": "PreviewImage", "pos": [1960, 480], "title": "masks after EM",
         "links": {"images": (i + 9, "IMAGE")}},
        {"id": i + 11, "type": "PreviewImage", "pos": [1580, 700], "title": "loss and mask change",
         "links": {"images": (i + 3, "curve")}},
        {"id": i + 12, "type": "ConceptEM_SaveBundle", "pos": [2340, 520],
         "links": {"em_model": (model_id, "em_model"), "concepts": (i + 4, "concepts")},
         "widgets": {"name": "my_concepts"}},
    ]


def full_sd15() -> dict:
    return build([
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [20, 40], "widgets": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        {"id": 2, "type": "ConceptEM_ModelFromCheckpoint", "pos": [20, 220],
         "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "vae": (1, "VAE")}},
        {"id": 3, "type": "LoadImage", "pos": [20, 380], "widgets": {"image": "example.png", "upload": "image"}},
        *learn_chain(2, (3, "IMAGE"), {"prompts": "a photo of [v1] and [v2] in [v3]",
                                       "init_words": "[v1]=man, [v2]=dog, [v3]=room"}, (200, 200), 400, 10, 512),
    ])


def tiny_world() -> dict:
    return build([
        {"id": 1, "type": "ConceptEM_ModelLoader", "pos": [20, 40]},
        {"id": 2, "type": "ConceptEM_TinyWorldScene", "pos": [20, 220]},
        *learn_chain(1, (2, "image"), {}, (60, 40), 40, 10, 64,
                     extra_links={"prompts": (2, "prompt"), "init_words": (2, "init_words")}),
    ])


def reuse() -> dict:
    return build([
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [20, 40], "widgets": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        {"id": 2, "type": "ConceptEM_ModelFromCheckpoint", "pos": [20, 220],
         "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "vae": (1, "VAE")}},
        {"id": 3, "type": "ConceptEM_LoadBundle", "pos": [380, 220], "links": {"em_model": (2, "em_model")},
         "widgets": {"bundle": "my_concepts_00001_.safetensors"}},
        {"id": 4, "type": "ConceptEM_ApplyToModel", "pos": [740, 40],
         "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "concepts": (3, "concepts")}},
        {"id": 5, "type": "ConceptEM_TextEncode", "pos": [1100, 40],
         "links": {"clip": (4, "clip"), "concept_name": (4, "concept_name"), "concepts": (3, "concepts")},
         "widgets": {"text": "[v1] shaking hands with a robot in [v3]"}},
        {"id": 6, "type": "CLIPTextEncode", "pos": [1100, 300], "links": {"clip": (4, "clip")},
         "widgets": {"text": "blurry, low quality"}},
        {"id": 7, "type": "EmptyLatentImage", "pos": [1100, 520], "widgets": {"width": 512, "height": 512,
                                                                             "batch_size": 4}},
        {"id": 8, "type": "KSampler", "pos": [1480, 40],
         "links": {"model": (4, "model"), "positive": (5, "CONDITIONING"), "negative": (6, "CONDITIONING"),
                   "latent_image": (7, "LATENT")},
         "widgets": {"seed": 1, "steps": 30, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                     "denoise": 1.0}},
        {"id": 9, "type": "VAEDecode", "pos": [1860, 40], "links": {"samples": (8, "LATENT"), "vae": (1, "VAE")}},
        {"id": 10, "type": "SaveImage", "pos": [2100, 40], "links": {"images": (9, "IMAGE")},
         "widgets": {"filename_prefix": "concept_em_reuse"}},
    ])


def main() -> None:
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, wf in {"concept_em_full_sd15.json": full_sd15(), "concept_em_tiny_world.json": tiny_world(),
                     "concept_em_reuse_bundle.json": reuse()}.items():
        (out / name).write_text(json.dumps(wf, indent=1), encoding="utf-8")
        print(out / name)


if __name__ == "__main__":
    main()
