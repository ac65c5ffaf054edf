"""The shipped workflows reference only node types that exist (this pack's, or ComfyUI core's as
recorded from its source in tests/data) with inputs that exist and links that fit."""
import json
from pathlib import Path

import pytest

import nodes as pack

ROOT = Path(__file__).resolve().parents[1]
CORE = json.loads((ROOT / "tests" / "data" / "comfyui_core_nodes.json").read_text())
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_LISTS = {("ConceptEM_LoadBundle", "bundle")}  # choices are whatever files the user has


def spec(node_type):
    if node_type in pack.NODE_CLASS_MAPPINGS:
        cls = pack.NODE_CLASS_MAPPINGS[node_type]
        it = cls.INPUT_TYPES()
        inputs, choices, required = {}, {}, set(it["required"])
        for section in ("required", "optional"):
            for k, decl in it.get(section, {}).items():
                inputs[k] = "COMBO" if isinstance(decl[0], list) else decl[0]
                if isinstance(decl[0], list):
                    choices[k] = decl[0]
        return inputs, list(cls.RETURN_TYPES), required, choices
    s = CORE["nodes"][node_type]
    return {**s["required"], **s["optional"]}, s["outputs"], set(s["required"]), {}


def test_there_are_the_three_workflows():
    assert [p.name for p in WORKFLOWS] == ["concept_em_full_sd15.json", "concept_em_reuse_bundle.json",
                                           "concept_em_tiny_world.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_node_definitions(path):
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}
    assert wf["last_node_id"] >= max(by_id) and wf["last_link_id"] >= max(links, default=0)
    for n in wf["nodes"]:
        t = n["type"]
        assert t in pack.NODE_CLASS_MAPPINGS or t in CORE["nodes"], f"unknown node type {t}"
        inputs, outputs, required, choices = spec(t)
        sockets = {i["name"]: i for i in n["inputs"]}
        assert set(sockets) <= set(inputs), (t, set(sockets) - set(inputs))
        for name, typ in inputs.items():
            if typ not in WIDGETS and name in required:
                assert sockets.get(name, {}).get("link") is not None, f"{t}.{name} is not connected"
        widget_names = [k for k, v in inputs.items() if v in WIDGETS]
        extra = sum(k in ("seed", "noise_seed") for k in widget_names) + (t == "LoadImage")
        assert len(n["widgets_values"]) == len(widget_names) + extra, t
        values = iter(n["widgets_values"])
        for k in widget_names:
            v = next(values)
            if k in choices and (t, k) not in FILE_LISTS:
                assert v in choices[k], (t, k, v)
            if k in ("seed", "noise_seed") or (t == "LoadImage" and k == "image"):
                next(values)
        assert [o["type"] for o in n["outputs"]] == outputs, t
        for slot, o in enumerate(n["outputs"]):
            for link_id in o["links"]:
                lk = links[link_id]
                assert lk[1] == n["id"] and lk[2] == slot and lk[5] == o["type"]
    for link_id, origin, slot, target, target_slot, typ in wf["links"]:
        socket = by_id[target]["inputs"][target_slot]
        assert socket["link"] == link_id
        inputs, _, _, _ = spec(by_id[target]["type"])
        want = inputs[socket["name"]]
        assert want == typ or (want == "STRING" and typ == "STRING"), (socket["name"], want, typ)
        assert by_id[origin]["outputs"][slot]["type"] == typ
