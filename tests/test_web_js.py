"""web/concept_em.js under Node.js with stand-ins for ComfyUI's app and api (skipped without `node`):
the pack's warnings ("concept_em.warning") and a resumed run's note reach the user as toasts, with the
older front ends' dialog or the console as fallbacks, and payloads missing fields break nothing."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[1] / "web" / "concept_em.js"
NODE = shutil.which("node")

HARNESS = r"""
const calls = [];
const listeners = {};
const api = { addEventListener: (name, fn) => { (listeners[name] = listeners[name] || []).push(fn); } };
const graphNodes = { 12: { title: "EM stage 1", comfyClass: "ConceptEM_EMTokenStep" } };
const app = {
  graph: { getNodeById: (id) => graphNodes[id] || null, setDirtyCanvas: () => {} },
  registerExtension: (ext) => { app.ext = ext; },
};
const MODE = %(mode)s;
if (MODE === "toast") app.extensionManager = { toast: { add: (t) => calls.push(["toast", t]) } };
if (MODE === "dialog") app.ui = { dialog: { show: (el) => calls.push(["dialog", el.textContent]) } };
if (MODE === "broken") app.extensionManager = { get toast() { throw new Error("no store"); } };
globalThis.document = { createElement: () => ({ textContent: "" }) };
console.warn = (...a) => calls.push(["console.warn", a.join(" ")]);
console.info = (...a) => calls.push(["console.info", a.join(" ")]);
%(source)s
app.ext.setup();
const fire = (name, detail) => listeners[name].forEach((fn) => fn({ detail }));
for (const [name, detail] of %(events)s) fire(name, detail);
process.stdout.write(JSON.stringify(calls));
"""


def run_js(mode: str, events: list) -> list:
    source = "\n".join(line for line in JS.read_text().splitlines() if not line.startswith("import "))
    script = HARNESS % {"mode": json.dumps(mode), "source": source, "events": json.dumps(events)}
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


WARNING = {"node": "12", "class": "EMTokenStep", "messages": ["DenseCRF removed [v2] entirely; kept ..."]}


@pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")
def test_warnings_show_as_toasts_naming_the_node():
    calls = run_js("toast", [["concept_em.warning", WARNING]])
    assert len(calls) == 1 and calls[0][0] == "toast"
    toast = calls[0][1]
    assert toast["severity"] == "warn" and toast["summary"] == "EM stage 1 #12"
    assert toast["detail"] == WARNING["messages"][0] and toast["life"] > 0


@pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")
def test_payloads_missing_fields_break_nothing():
    events = [["concept_em.warning", {"messages": ["no node id"]}],
              ["concept_em.warning", {"node": "99", "class": "JointFinetune", "messages": ["unknown node"]}],
              ["concept_em.warning", {"node": "3"}],  # no messages: nothing to show
              ["concept_em.warning", {"message": "one message"}],
              ["concept_em.warning", None],
              ["concept_em.progress", {"node": "12", "step": 7, "total": 20, "losses": [],
                                       "note": "resumed from step 7 (the cancelled run's checkpoint)"}]]
    calls = run_js("toast", events)
    shown = [(c[1]["severity"], c[1]["summary"], c[1]["detail"]) for c in calls]
    assert shown == [("warn", "Concept EM", "no node id"), ("warn", "JointFinetune #99", "unknown node"),
                     ("warn", "Concept EM", "one message"),
                     ("info", "EM stage 1 #12", "resumed from step 7 (the cancelled run's checkpoint)")]


@pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")
@pytest.mark.parametrize("mode", ["dialog", "none", "broken"])
def test_without_a_toast_the_warning_goes_to_a_dialog_or_the_console(mode):
    calls = run_js(mode, [["concept_em.warning", WARNING]])
    kinds = [c[0] for c in calls]
    assert kinds == (["console.warn", "dialog"] if mode == "dialog" else ["console.warn"])
    assert all(WARNING["messages"][0] in c[1] for c in calls)
