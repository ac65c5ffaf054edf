"""Writes the shipped workflows (ComfyUI's UI format) from compact specs, using this pack's node
definitions and the core node definitions recorded from ComfyUI's source in
tests/data/comfyui_core_nodes.json, so every input name and widget order matches.

    python tools/make_workflows.py
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nodes as pack  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the front end adds a control_after_generate value after these


@functools.lru_cache(maxsize=None)
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


# The front end's node measurements (ComfyUI_frontend's LGraphNode.computeSize, litegraph constants):
# a title bar above the node's position, a row per input socket / output, a row per widget.
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: drawn above pos
SLOT_H = 20  # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_H = 20  # LiteGraph.NODE_WIDGET_HEIGHT, plus 4 between widgets
MULTILINE_H = 120  # a textarea widget's height, generously (its CSS minimum is smaller)
MULTILINE_MIN_W = 400  # a node with a textarea is at least this wide (the front end's minNodeSize)
CHAR_W = 9  # px per character of a 14 px label, generously (the front end measures the text)
# A node showing images (node.imgs: Load/Save/Preview Image, and the live preview of EM Token Step /
# Joint Finetune) gets an image widget at least 220 px high, so it grows by that and a gap: the
# learning nodes went from 266 to 478 px in the real front end.
IMAGE_H = 224
SHOWS_IMAGES = {"LoadImage", "SaveImage", "PreviewImage"}  # stored with room for their image
LIVE_PREVIEW = {"ConceptEM_EMTokenStep", "ConceptEM_JointFinetune"}  # grow when a run starts
MULTILINE_CORE = {("CLIPTextEncode", "text")}  # recorded core specs have no options; this one is multiline
GAP_X, GAP_Y = 60, 50


def widget_rows(node_type: str) -> list[tuple[str, int]]:
    """(name, height) of each widget the front end makes for the node, in order."""
    rows = []
    cls = pack.NODE_CLASS_MAPPINGS.get(node_type)
    if cls is not None:
        decls = {k: d for sec in ("required", "optional") for k, d in cls.INPUT_TYPES().get(sec, {}).items()}
        kinds = {k: ("COMBO" if isinstance(d[0], list) else d[0]) for k, d in decls.items()}
        multiline = {k for k, d in decls.items() if len(d) > 1 and d[1].get("multiline")}
    else:
        kinds = node_specs()[node_type]["inputs"]
        multiline = {k for t, k in MULTILINE_CORE if t == node_type}
    for name, typ in kinds.items():
        if typ not in WIDGET_TYPES:
            continue
        rows.append((name, MULTILINE_H if name in multiline else WIDGET_H))
        if name in SEED_NAMES:
            rows.append(("control_after_generate", WIDGET_H))
        if node_type == "LoadImage" and name == "image":
            rows.append(("upload", WIDGET_H))
    return rows


def node_size(node_type: str, title: str | None = None) -> list[int]:
    """The size the front end gives the node (no smaller), with room for its image if it shows one."""
    spec = node_specs()[node_type]
    sockets = [k for k, t in spec["inputs"].items() if t not in WIDGET_TYPES]
    rows = max(len(sockets), len(spec["outputs"]), 1)
    widgets = widget_rows(node_type)
    height = rows * SLOT_H + (sum(h + 4 for _, h in widgets) + 8 if widgets else 0) + 6
    if node_type in SHOWS_IMAGES:
        height += IMAGE_H
    labels = [n for n, _ in widgets] + sockets + list(spec["output_names"])
    title = title or pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type)
    width = max([CHAR_W * len(label) + 130 for label in labels] + [CHAR_W * len(title) + 50, 320])
    if any(h == MULTILINE_H for _, h in widgets):
        width = max(width, MULTILINE_MIN_W)
        height = max(height, 200)
    return [int(width), int(height)]


def shown_height(node: dict) -> int:
    """How tall the node gets on the canvas once it has run: the live preview's image widget."""
    return node["size"][1] + (IMAGE_H if node["type"] in LIVE_PREVIEW else 0)


def layout(columns: list[list[dict]], x0: int = 20, y0: int = 50) -> list[dict]:
    """Places columns of nodes left to right and each column's nodes top to bottom, every node at
    least its measured size, a node's live preview and title bar included, so none overlaps another."""
    placed, x = [], x0
    for column in columns:
        y, width = y0, 0
        for n in column:
            n = dict(n)
            measured = node_size(n["type"], n.get("title"))
            n["size"] = [max(a, b) for a, b in zip(n.get("size", measured), measured)]
            n["pos"] = [x, y]
            y += shown_height(n) + TITLE_H + GAP_Y
            width = max(width, n["size"][0])
            placed.append(n)
        x += width + GAP_X
    return sorted(placed, key=lambda n: n["id"])


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
        ui_nodes.append({"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"],
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


def learn_columns(model_column: list[dict], model_id: int, image_link, prompt_widget: dict, steps: tuple,
                  finetune_steps: int, first: int, width: int, extra_links: dict | None = None) -> list[list[dict]]:
    """Mask init -> CRF -> two EM stages -> joint fine-tune -> generate, with mask previews, by column."""
    i = first
    return [
        model_column,
        [{"id": i, "type": "ConceptEM_AttentionMaskInit",
          "links": {"em_model": (model_id, "em_model"), "images": image_link, **(extra_links or {})},
          "widgets": prompt_widget}],
        [{"id": i + 1, "type": "ConceptEM_DenseCRFRefine", "links": {"concepts": (i, "concepts")}},
         {"id": i + 7, "type": "ConceptEM_MaskOverlay", "links": {"image": image_link, "masks": (i + 1, "masks")}},
         {"id": i + 8, "type": "PreviewImage", "title": "masks after DenseCRF", "links": {"images": (i + 7, "IMAGE")}}],
        [{"id": i + 2, "type": "ConceptEM_EMTokenStep", "title": "EM stage 1",
          "links": {"em_model": (model_id, "em_model"), "concepts": (i + 1, "concepts")},
          "widgets": {"steps": steps[0], "refresh_every": max(1, steps[0] // 4)}}],
        [{"id": i + 3, "type": "ConceptEM_EMTokenStep", "title": "EM stage 2 (lower lr)",
          "links": {"em_model": (model_id, "em_model"), "concepts": (i + 2, "concepts")},
          "widgets": {"steps": steps[1], "learning_rate": 2.5e-4, "refresh_every": max(1, steps[1] // 2)}},
         {"id": i + 9, "type": "ConceptEM_MaskOverlay", "links": {"image": image_link, "masks": (i + 3, "masks")}},
         {"id": i + 10, "type": "PreviewImage", "title": "masks after EM", "links": {"images": (i + 9, "IMAGE")}},
         {"id": i + 11, "type": "PreviewImage", "title": "loss and mask change", "links": {"images": (i + 3, "curve")}}],
        [{"id": i + 4, "type": "ConceptEM_JointFinetune",
          "links": {"em_model": (model_id, "em_model"), "concepts": (i + 3, "concepts")},
          "widgets": {"steps": finetune_steps, "mode": "lora"}}],
        [{"id": i + 5, "type": "ConceptEM_Generate",
          "links": {"em_model": (model_id, "em_model"), "concepts": (i + 4, "concepts")},
          "widgets": {"prompt": "a photo of [v1] and [v2] on [v3]", "width": width, "height": width,
                      "batch_size": 4}},
         {"id": i + 12, "type": "ConceptEM_SaveBundle",
          "links": {"em_model": (model_id, "em_model"), "concepts": (i + 4, "concepts")},
          "widgets": {"name": "my_concepts"}}],
        [{"id": i + 6, "type": "SaveImage", "links": {"images": (i + 5, "IMAGE")},
          "widgets": {"filename_prefix": "concept_em"}}],
    ]


def full_sd15(ckpt: str = "v1-5-pruned-emaonly.safetensors", side: int = 512) -> dict:
    models = [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": ckpt}},
        {"id": 2, "type": "ConceptEM_ModelFromCheckpoint",
         "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "vae": (1, "VAE")}},
        {"id": 3, "type": "LoadImage", "widgets": {"image": "example.png", "upload": "image"}},
    ]
    return build(layout(learn_columns(models, 2, (3, "IMAGE"), {"prompts": "a photo of [v1] and [v2] in [v3]",
                                                                "init_words": "[v1]=man, [v2]=dog, [v3]=room"},
                                      (200, 200), 400, 10, side)))


def full_sdxl() -> dict:
    """The same graph on SDXL base 1.0 at its own 1024 px."""
    return full_sd15("sd_xl_base_1.0.safetensors", 1024)


def tiny_scene_text(seed: int, objects: int) -> tuple[str, str]:
    """What Tiny World Scene's prompt and init_words outputs carry for these widget values."""
    _, prompt, init = pack.NODE_CLASS_MAPPINGS["ConceptEM_TinyWorldScene"]().run(seed, objects)
    return prompt, init


def tiny_world() -> dict:
    scene = defaults("ConceptEM_TinyWorldScene")
    prompt, init = tiny_scene_text(scene["seed"], scene["objects"])
    models = [{"id": 1, "type": "ConceptEM_ModelLoader"}, {"id": 2, "type": "ConceptEM_TinyWorldScene"}]
    # The linked prompt boxes store what the links supply, so the (greyed) boxes show the real prompt.
    return build(layout(learn_columns(models, 1, (2, "image"), {"prompts": prompt, "init_words": init}, (60, 40),
                                      40, 10, 64, extra_links={"prompts": (2, "prompt"),
                                                               "init_words": (2, "init_words")})))


def reuse() -> dict:
    return build(layout([
        [{"id": 1, "type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
         {"id": 2, "type": "ConceptEM_ModelFromCheckpoint",
          "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "vae": (1, "VAE")}}],
        [{"id": 3, "type": "ConceptEM_LoadBundle", "links": {"em_model": (2, "em_model")},
          "widgets": {"bundle": "my_concepts_00001_.safetensors"}}],
        [{"id": 4, "type": "ConceptEM_ApplyToModel",
          "links": {"model": (1, "MODEL"), "clip": (1, "CLIP"), "concepts": (3, "concepts")}}],
        [{"id": 5, "type": "ConceptEM_TextEncode",
          "links": {"clip": (4, "clip"), "concept_name": (4, "concept_name"), "concepts": (3, "concepts")},
          "widgets": {"text": "[v1] shaking hands with a robot in [v3]"}},
         {"id": 6, "type": "CLIPTextEncode", "links": {"clip": (4, "clip")}, "widgets": {"text": "blurry, low quality"}},
         {"id": 7, "type": "EmptyLatentImage", "widgets": {"width": 512, "height": 512, "batch_size": 4}}],
        [{"id": 8, "type": "KSampler",
          "links": {"model": (4, "model"), "positive": (5, "CONDITIONING"), "negative": (6, "CONDITIONING"),
                    "latent_image": (7, "LATENT")},
          "widgets": {"seed": 1, "steps": 30, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                      "denoise": 1.0}}],
        [{"id": 9, "type": "VAEDecode", "links": {"samples": (8, "LATENT"), "vae": (1, "VAE")}}],
        [{"id": 10, "type": "SaveImage", "links": {"images": (9, "IMAGE")},
          "widgets": {"filename_prefix": "concept_em_reuse"}}],
    ]))


def main() -> None:
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, wf in {"concept_em_full_sd15.json": full_sd15(), "concept_em_full_sdxl.json": full_sdxl(),
                     "concept_em_tiny_world.json": tiny_world(),
                     "concept_em_reuse_concepts.json": reuse()}.items():
        (out / name).write_text(json.dumps(wf, indent=1), encoding="utf-8")
        print(out / name)


if __name__ == "__main__":
    main()
