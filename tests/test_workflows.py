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


def test_there_are_the_four_workflows():
    assert [p.name for p in WORKFLOWS] == ["concept_em_full_sd15.json", "concept_em_full_sdxl.json",
                                           "concept_em_reuse_concepts.json", "concept_em_tiny_world.json"]


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
        assert want == typ, (socket["name"], want, typ)
        assert by_id[origin]["outputs"][slot]["type"] == typ


# Layout (issue 16, part 6). A node's rectangle on the canvas: its title bar (30 px) above its
# position, its stored size below; EM Token Step and Joint Finetune grow by their live preview's
# image widget once they run (266 -> 478 px measured in the real front end; 224 allowed here).
TITLE_H = 30
LIVE_PREVIEW = {"ConceptEM_EMTokenStep": 224, "ConceptEM_JointFinetune": 224}


def rectangle(n):
    x, y = n["pos"]
    w, h = n["size"]
    return x, y - TITLE_H, x + w, y + h + LIVE_PREVIEW.get(n["type"], 0)


def front_end_minimum(n):
    """The least size ComfyUI's front end gives a node (LGraphNode.computeSize: a 20 px row per socket
    or output, 24 px per widget, 14 px of margins); a smaller stored size is enlarged on load, which
    is how the nodes of the earlier workflows came to overlap."""
    inputs, outputs, _, _ = spec(n["type"])
    sockets = [k for k, t in inputs.items() if t not in WIDGETS]
    widgets = [k for k, t in inputs.items() if t in WIDGETS]
    extra = sum(k in ("seed", "noise_seed") for k in widgets) + (n["type"] == "LoadImage")
    rows = max(len(sockets), len(outputs), 1)
    return 20 * rows + ((24 * (len(widgets) + extra) + 8) if widgets else 0) + 6


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_overlap_even_with_the_live_preview(path):
    wf = json.loads(path.read_text())
    nodes = wf["nodes"]
    for n in nodes:
        assert n["size"][1] >= front_end_minimum(n), (n["id"], n["type"], n["size"], front_end_minimum(n))
        if n["type"] in ("SaveImage", "PreviewImage", "LoadImage"):  # room for the image they show
            assert n["size"][1] >= front_end_minimum(n) + 212, (n["id"], n["type"])
    for i, a in enumerate(nodes):
        ra = rectangle(a)
        for b in nodes[i + 1:]:
            rb = rectangle(b)
            apart = ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1]
            assert apart, f"{path.name}: node {a['id']} ({a['type']}) {ra} overlaps node {b['id']} ({b['type']}) {rb}"


def test_the_measured_sizes_match_the_real_front_end():
    """EM Token Step measured 266 px tall in the real front end with 8 widgets (issue 16); the formula
    agrees, and gives 24 px (one widget row) less for the 7 it has since mask_source was removed (issue 18)."""
    em = next(n for n in json.loads(WORKFLOWS[0].read_text())["nodes"] if n["type"] == "ConceptEM_EMTokenStep")
    assert len(em["widgets_values"]) == 7
    assert front_end_minimum(em) == 266 - 24 and em["size"][1] == 242
    assert em["size"][1] + LIVE_PREVIEW[em["type"]] >= 478 - 24  # the preview grew it by 212 px


def test_a_linked_widget_stores_what_its_link_supplies():
    """A widget fed by a link is drawn greyed with its stored value: the tiny workflow's prompt boxes
    must hold what Tiny World Scene gives them, not a stale default."""
    wf = json.loads((ROOT / "workflows" / "concept_em_tiny_world.json").read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    checked = 0
    for link_id, origin, slot, target, target_slot, typ in wf["links"]:
        socket = by_id[target]["inputs"][target_slot]
        if "widget" not in socket:
            continue
        source = by_id[origin]
        assert source["type"] == "ConceptEM_TinyWorldScene", "a linked widget whose value the test cannot compute"
        seed, _control, objects = source["widgets_values"]
        supplied = pack.NODE_CLASS_MAPPINGS[source["type"]]().run(seed, objects)[slot]
        inputs, _, _, _ = spec(by_id[target]["type"])
        widget_names = [k for k, v in inputs.items() if v in WIDGETS]
        values = by_id[target]["widgets_values"]
        position = widget_names.index(socket["name"])
        position += sum(k in ("seed", "noise_seed") for k in widget_names[:position])
        assert values[position] == supplied, (socket["name"], values[position], supplied)
        checked += 1
    assert checked == 2  # prompts and init_words


def test_every_node_has_a_description_and_every_input_a_tooltip():
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert isinstance(getattr(cls, "DESCRIPTION", None), str) and len(cls.DESCRIPTION) > 40, name
        it = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, decl in it.get(section, {}).items():
                opts = decl[1] if len(decl) > 1 else {}
                assert isinstance(opts.get("tooltip"), str) and opts["tooltip"].strip(), (name, inp)
        tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        assert tips is None or len(tips) == len(cls.RETURN_TYPES), name


def test_the_fine_tunes_auto_learning_rate_is_spelled_out():
    from nodes.learn_nodes import JointFinetune

    decl = JointFinetune.INPUT_TYPES()["required"]["learning_rate"]
    assert decl[1]["default"] == 0.0
    tip = decl[1]["tooltip"]
    assert "0 = auto" in tip and "2e-6" in tip and "1e-4" in tip
    js = (ROOT / "web" / "concept_em.js").read_text()
    assert 'learning_rate (0 = auto)' in js and 'auto (2e-6)' in js and 'auto (1e-4)' in js


def test_the_shipped_workflows_are_what_the_generator_writes():
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    mw = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mw)
    for name, make in (("concept_em_full_sd15.json", mw.full_sd15), ("concept_em_full_sdxl.json", mw.full_sdxl),
                       ("concept_em_tiny_world.json", mw.tiny_world),
                       ("concept_em_reuse_concepts.json", mw.reuse)):
        assert json.loads((ROOT / "workflows" / name).read_text()) == json.loads(json.dumps(make())), \
            f"{name} is stale: run python tools/make_workflows.py"
