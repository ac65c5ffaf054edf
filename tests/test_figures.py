"""Every figure the README and the docs quote agrees with the results JSON it cites (issue 15, part 7)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("bench_figures", ROOT / "benchmarks" / "figures.py")
figures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(figures)

PROV = {"command": "python x.py", "commit": {"head": "abc", "modified": []}, "machine": {"cores": 2}}


def test_every_quoted_figure_agrees_with_its_json():
    assert figures.check() == []


def test_the_docs_quote_figures_at_all():
    """The check is only worth something if the docs carry citations for it to read."""
    text = "".join((ROOT / d).read_text() for d in figures.DOCS)
    assert text.count("<!--fig ") >= 10 and "<!--table crf " in text


def test_every_current_results_json_says_how_it_was_made():
    files = sorted((ROOT / "benchmarks").glob("results_*.json"))
    assert files
    for f in files:
        data = json.loads(f.read_text())
        assert all(k in data for k in figures.PROVENANCE), f.name


def _doc(tmp_path, text, data):
    (tmp_path / "r.json").write_text(json.dumps({**PROV, **data}))
    (tmp_path / "d.md").write_text(text)
    return figures.check(tmp_path, ["d.md"])


ROWS = {"rows": [{"side": 512, "seed": "all", "a": 0.7404, "b": 0.6567, "s": 1.4249},
                 {"side": 256, "seed": "all", "a": 0.5, "b": 0.5, "s": 0.1}]}


@pytest.mark.parametrize("quoted, ok", [("8.4", True), ("+8.4", True), ("8.37", True), ("8.3", False), ("8", True),
                                        ("9", False)])
def test_a_figure_agrees_only_at_its_own_precision(tmp_path, quoted, ok):
    text = f"gain {quoted}<!--fig r.json: 100 * ({{rows[side=512,seed=all].a}} - {{rows[side=512,seed=all].b}})--> points"
    problems = _doc(tmp_path, text, ROWS)
    assert (problems == []) == ok, problems


def test_units_and_plain_keys(tmp_path):
    assert _doc(tmp_path, "took 1.42 s<!--fig r.json: {rows[side=512,seed=all].s}--> and 1.0x<!--fig r.json: {k}-->",
                {**ROWS, "k": 1.04}) == []
    problems = _doc(tmp_path, "took 1.43 s<!--fig r.json: {rows[side=512,seed=all].s}-->", ROWS)
    assert len(problems) == 1 and "quotes 1.43" in problems[0] and "d.md:1" in problems[0]


@pytest.mark.parametrize("ref, why", [("{rows[side=128,seed=all].a}", "0 elements"), ("{nope}", "no key"),
                                      ("__import__('os')", "not allowed")])
def test_a_citation_that_does_not_resolve_is_a_problem(tmp_path, ref, why):
    problems = _doc(tmp_path, f"x 1.0<!--fig r.json: {ref}-->", ROWS)
    assert len(problems) == 1 and why in problems[0], problems


def test_a_missing_json_or_a_json_without_provenance_is_a_problem(tmp_path):
    (tmp_path / "d.md").write_text("x 1.0<!--fig gone.json: {k}-->")
    assert "gone.json" in figures.check(tmp_path, ["d.md"])[0]
    (tmp_path / "bare.json").write_text(json.dumps({"k": 1.0}))
    (tmp_path / "d.md").write_text("x 1.0<!--fig bare.json: {k}-->")
    problems = figures.check(tmp_path, ["d.md"])
    assert len(problems) == 1 and "command, commit, machine" in problems[0]


def test_a_comment_with_no_number_before_it_is_a_problem(tmp_path):
    assert _doc(tmp_path, "about right<!--fig r.json: {rows[side=512,seed=all].s}-->", ROWS)


def _crf_json(preset, after):
    return {**PROV, "preset": preset, "params": {"max_side": None}, "data": "photographs",
            "rows": [{"side": 512, "seed": "all", "scene": "mean", "iou_before": 0.5, "iou_after": after, "crf_s": 1.0}]}


def test_a_generated_table_is_checked_and_rewritten(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(_crf_json("cutler", 0.6)))
    (tmp_path / "d.json").write_text(json.dumps(_crf_json("deeplab", 0.55)))
    (tmp_path / "d.md").write_text("# t\n<!--table crf c.json d.json-->\nold\n<!--/table-->\nafter\n")
    problems = figures.check(tmp_path, ["d.md"])
    assert len(problems) == 1 and "table crf differs" in problems[0]
    figures.check(tmp_path, ["d.md"], write=True)
    text = (tmp_path / "d.md").read_text()
    assert "| photos, 512 px | full size | 0.500 | 0.600, +10.0, 1.00 | 0.550, +5.0, 1.00 |" in text
    assert text.endswith("<!--/table-->\nafter\n") and figures.check(tmp_path, ["d.md"]) == []
    (tmp_path / "d.md").write_text(text.replace("+10.0", "+11.0"))
    assert figures.check(tmp_path, ["d.md"])


def test_provenance_names_the_commit_a_run_began_on(monkeypatch):
    from em_core import provenance as prov

    heads = iter([{"head": "a" * 40, "modified": []}, {"head": "b" * 40, "modified": []},
                  {"head": "b" * 40, "modified": []}])
    monkeypatch.setattr(prov, "commit", lambda: next(heads))
    monkeypatch.setattr(prov, "_started", None)
    prov.begin()  # the run starts on a...
    block = prov.provenance(config={"x": 1}, argv=["benchmarks/em_options.py"])  # ...and ends on b
    assert block["commit"]["head"] == "a" * 40 and block["commit_at_end"]["head"] == "b" * 40
    monkeypatch.setattr(prov, "_started", None)  # no begin(): HEAD at the end, nothing more
    block = prov.provenance(argv=["x.py"])
    assert block["commit"]["head"] == "b" * 40 and "commit_at_end" not in block
