"""The figures our docs quote, checked against the results JSON they cite (issue 15, part 7).

A figure in prose is the number, then a comment naming its source:

    CutLER gains 8.3<!--fig benchmarks/results_crf_real_photos_cutler.json: 100 * ({rows[side=512,seed=all].iou_after} - {rows[side=512,seed=all].iou_before})--> points

The expression is arithmetic (numbers, + - * /, parentheses) over {PATH} references into the
JSON: keys joined by dots; `rows[side=512,seed=all]` picks the one list element whose fields
equal those values; a bare integer picks by index. The figure agrees when the expression rounds
to the quoted number at the quoted number of decimals (a "+", thousands commas and a trailing
"x", "%", " s" or " MB" are allowed around it).

A table is generated whole from its JSON, between two comments:

    <!--table crf benchmarks/results_crf_real_photos_cutler.json ...-->
    ...
    <!--/table-->

Every cited JSON must say how it was made: `command`, `commit` and `machine`.

    python benchmarks/figures.py            # check every doc, exit 1 on any disagreement
    python benchmarks/figures.py --write    # regenerate the tables in place, then check
"""
from __future__ import annotations

import ast
import json
import operator
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/deviations.md", "benchmarks/README.md")
PROVENANCE = ("command", "commit", "machine")

_FIG = re.compile(r"(?P<num>[+-]?\d[\d,]*(?:\.\d+)?)(?P<unit>x|%| s| MB)?\s*<!--fig (?P<file>\S+?): (?P<expr>.*?)-->")
_TABLE = re.compile(r"<!--table (?P<name>\w+) (?P<files>[^>]*?)-->\n(?P<body>.*?)<!--/table-->", re.S)
_REF = re.compile(r"\{([^{}]+)\}")


def lookup(data, path: str):
    """The value at `path` (see the module's docstring) in parsed JSON."""
    node = data
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        if part.startswith("["):
            conds = dict(c.split("=", 1) for c in part[1:-1].split(","))
            hits = [x for x in node if isinstance(x, dict) and all(str(x.get(k)) == v for k, v in conds.items())]
            if len(hits) != 1:
                raise KeyError(f"{path}: {len(hits)} elements match [{part[1:-1]}], need exactly one")
            node = hits[0]
        elif isinstance(node, list):
            node = node[int(part)]
        else:
            if part not in node:
                raise KeyError(f"{path}: no key {part!r}")
            node = node[part]
    return node


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str, data) -> float:
    """Arithmetic over {PATH} references; nothing else is evaluated."""
    values = {}

    def ref(m):
        name = f"_r{len(values)}"
        values[name] = float(lookup(data, m.group(1)))
        return name

    tree = ast.parse(_REF.sub(ref, expr), mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        raise ValueError(f"not allowed in a figure's expression: {ast.dump(node)[:60]}")

    return ev(tree)


def agrees(quoted: str, value: float) -> bool:
    text = quoted.replace(",", "").lstrip("+")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(value - float(text)) <= 0.5 * 10 ** -decimals + 1e-9


def _load(root: Path, rel: str, cache: dict):
    if rel not in cache:
        cache[rel] = json.loads((root / rel).read_text())
    return cache[rel]


def _mean_row(data, side, seed="all"):
    return lookup(data, f"rows[side={side},seed={seed}]")


def table_crf(files: list[dict]) -> str:
    """The DenseCRF table: one JSON per (preset, working side), the photographs' and the tiny world's."""
    by = {}
    for d in files:
        for r in d["rows"]:
            if r.get("seed") == "all":
                key = ("tiny world" if d["data"].startswith("tiny") else "photos", r["side"],
                       d["params"].get("max_side"))
                by.setdefault(key, {})[d["preset"]] = r
    lines = ["| data, side | DenseCRF works at | before | CutLER: after, gain, s per image | "
             "DeepLab-v2: after, gain, s per image |", "|---|---|---|---|---|"]
    for (data, side, max_side), presets in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1], -(kv[0][2] or 10 ** 6))):
        before = next(iter(presets.values()))["iou_before"]
        cells = []
        for p in ("cutler", "deeplab"):
            r = presets.get(p)
            cells.append("-" if r is None else
                         f"{r['iou_after']:.3f}, {100 * (r['iou_after'] - r['iou_before']):+.1f}, {r['crf_s']:.2f}")
        work = "full size" if max_side is None or max_side >= side else f"{max_side} px"
        lines.append(f"| {data}, {side} px | {work} | {before:.3f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


TABLES = {"crf": table_crf}


def check(root: Path = ROOT, docs=DOCS, write: bool = False) -> list[str]:
    """Every disagreement between a doc and the JSON it cites, as readable lines (empty: all agree)."""
    problems, cache = [], {}
    for doc in docs:
        path = root / doc
        text = path.read_text()
        cited = set()
        for m in _FIG.finditer(text):
            where = f"{doc}:{text.count(chr(10), 0, m.start()) + 1}"
            cited.add(m["file"])
            try:
                value = evaluate(m["expr"], _load(root, m["file"], cache))
            except (OSError, KeyError, ValueError, IndexError, TypeError, SyntaxError) as e:
                problems.append(f"{where}: {m['num']} cites {m['file']}: {e}")
                continue
            if not agrees(m["num"], value):
                problems.append(f"{where}: quotes {m['num']}, {m['file']} gives {value:.6g}")
        if "<!--fig " in text and text.count("<!--fig ") != len(_FIG.findall(text)):
            problems.append(f"{doc}: a <!--fig ...--> comment without a number right before it")

        def table(m):
            files = m["files"].split()
            cited.update(files)
            fn = TABLES.get(m["name"])
            if fn is None:
                problems.append(f"{doc}: no table generator {m['name']!r}; known: {', '.join(TABLES)}")
                return m[0]
            try:
                body = fn([_load(root, f, cache) for f in files])
            except (OSError, KeyError, ValueError) as e:
                problems.append(f"{doc}: table {m['name']}: {e}")
                return m[0]
            if body != m["body"] and not write:
                problems.append(f"{doc}: table {m['name']} differs from what {' '.join(files)} give "
                                f"(python benchmarks/figures.py --write regenerates it)")
            return f"<!--table {m['name']} {m['files']}-->\n{body}<!--/table-->"

        new = _TABLE.sub(table, text)
        if write and new != text:
            path.write_text(new)
        for rel in sorted(cited):
            try:
                missing = [k for k in PROVENANCE if k not in _load(root, rel, cache)]
            except OSError:
                continue  # reported above
            if missing:
                problems.append(f"{doc}: cites {rel}, which does not record its {', '.join(missing)}")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problems = check(write="--write" in argv)
    for p in problems:
        print(p)
    print(f"{len(problems)} disagreement(s)" if problems else "every quoted figure agrees with its JSON")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
