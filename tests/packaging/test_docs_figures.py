"""The documents' figures equal the benchmark results they cite, and their relative links resolve.

A figure in README.md or docs/performance.md carries a marker right after it:

    **1.089x** <!-- fig step_time_accum_cpu.json:engines.spngd.ratio_to_sgd -->
    675 MiB <!-- fig memory.json:layer[1].max_bytes as MiB -->

The file is under bench/results/. The path walks the JSON: keys separated by dots, list items as
[i]; a key that itself holds dots or spaces ("full batch", "0.5") is matched whole, since at each
level the longest dotted run of the path that names a key is taken. An optional "as <scale>" (not
"|", which would split a table cell) turns the stored value into the unit written: MiB
(bytes / 2**20), GiB, KiB, ms (seconds x 1000), percent (a fraction x 100). The value is then
rounded to the digits the figure shows, with thousands separators where the figure has them; "x",
"%", units and bold around the figure are not part of the number.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
FIGURE_DOCS = [ROOT / "README.md", ROOT / "docs" / "performance.md", ROOT / "docs" / "transformers.md"]

SCALES = {"MiB": 1 / 2**20, "GiB": 1 / 2**30, "KiB": 1 / 2**10, "ms": 1000.0, "percent": 100.0}

# A number (thousands separators allowed), what may stand between it and its marker (a unit, "x",
# "%", closing bold), then the marker.
MARKER = re.compile(
    r"(?P<number>-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)"
    r"(?P<between>[^\d<]{0,8}?)\s*"
    r"<!--\s*fig\s+(?P<file>[^:\s]+):(?P<path>.+?)(?:\s+as\s+(?P<scale>\w+))?\s*-->"
)
ANY_MARKER = re.compile(r"<!--\s*fig\b")


def resolve(data: Any, path: str) -> Any:
    """The value at `path` (dotted keys, [i] indices) in `data`; KeyError naming what is missing."""
    rest = path
    node = data
    while rest:
        index = re.match(r"\[(\d+)\]\.?", rest)
        if index:
            if not isinstance(node, list) or int(index.group(1)) >= len(node):
                raise KeyError(f"no item {index.group(0)} at ...{rest!r}")
            node = node[int(index.group(1))]
            rest = rest[index.end() :]
            continue
        if not isinstance(node, dict):
            raise KeyError(f"{rest!r}: not an object")
        # The longest dotted prefix (up to the next [i]) that is a key of this object.
        head = re.match(r"[^\[]*", rest)
        assert head is not None
        parts = head.group(0).split(".")
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                node = node[key]
                rest = rest[len(key) :]
                rest = rest[1:] if rest.startswith(".") else rest
                break
        else:
            raise KeyError(f"no key {parts[0]!r} (keys: {sorted(node)[:12]})")
    return node


def format_like(value: float, written: str) -> str:
    """`value` rounded to the decimals of `written`, with its thousands separators."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    return f"{value:{',' if ',' in written else ''}.{decimals}f}"


def markers(text: str) -> list[re.Match[str]]:
    return list(MARKER.finditer(text))


def check_document(doc: Path) -> list[str]:
    """Every mismatch, missing file or key, and marker without a figure in `doc`."""
    text = doc.read_text()
    found = markers(text)
    problems = []
    if len(found) != len(ANY_MARKER.findall(text)):
        spans = {m.start("file") for m in found}
        for m in ANY_MARKER.finditer(text):
            if not any(m.start() < s < m.start() + 40 for s in spans):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{doc.name}:{line}: a marker with no figure right before it")
    for m in found:
        line = text.count("\n", 0, m.start()) + 1
        where = f"{doc.name}:{line}: {m.group('number')} ({m.group('file')}:{m.group('path')})"
        source = RESULTS / m.group("file")
        if not source.is_file():
            problems.append(f"{where}: no file bench/results/{m.group('file')}")
            continue
        try:
            value = resolve(json.loads(source.read_text()), m.group("path"))
        except KeyError as err:
            problems.append(f"{where}: {err}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: not a number: {value!r}")
            continue
        scale = m.group("scale")
        if scale is not None and scale not in SCALES:
            problems.append(f"{where}: unknown scale {scale!r} (known: {sorted(SCALES)})")
            continue
        expected = format_like(value * SCALES[scale] if scale else value, m.group("number"))
        if expected != m.group("number"):
            problems.append(f"{where}: the results say {expected}")
    return problems


@pytest.mark.parametrize("doc", FIGURE_DOCS, ids=lambda p: p.name)
def test_figures_match_results(doc: Path) -> None:
    assert markers(doc.read_text()), f"{doc.name} has no figure markers"
    problems = check_document(doc)
    assert not problems, "\n".join(problems)


def test_readme_results_table_is_marked() -> None:
    """Every figure in the README's results table carries a marker."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Results"))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not re.match(r"\|[\s\-|]+\|$", line):
            rows.append(line)
    assert len(rows) > 5, "no results table under '## Results'"
    marked = 0
    for row in rows[1:]:
        figure_cell = row.split("|")[2]
        numbers = re.findall(r"\d[\d,.]*(?![^<]*-->)", figure_cell)
        assert len(numbers) == len(markers(figure_cell)), f"unmarked figure in: {row}"
        marked += len(numbers)
    assert marked >= len(rows) - 2, "most rows of the results table should hold a figure"


def test_checker_catches_an_edited_figure(tmp_path: Path) -> None:
    """The checker fails on a figure that differs from its result in the last digit shown."""
    doc = tmp_path / "doc.md"
    value = json.loads((RESULTS / "vs_asdl.json").read_text())["ratio_median"]
    right = format_like(value, "0.000")
    wrong = format_like(value + 0.001, "0.000")
    doc.write_text(f"ASDL **{right}x** <!-- fig vs_asdl.json:ratio_median -->\n")
    assert check_document(doc) == []
    doc.write_text(f"ASDL **{wrong}x** <!-- fig vs_asdl.json:ratio_median -->\n")
    assert len(check_document(doc)) == 1
    doc.write_text("ASDL 0.5 <!-- fig vs_asdl.json:no_such_key -->\n")
    assert "no key" in check_document(doc)[0]


def test_resolve_paths() -> None:
    data = {"a": [{"b.c": {"d": 1}}], "full batch": {"x": 2.5}}
    assert resolve(data, "a[0].b.c.d") == 1
    assert resolve(data, "full batch.x") == 2.5
    with pytest.raises(KeyError):
        resolve(data, "a[1]")
    assert format_like(3250, "3,250") == "3,250"
    assert format_like(1.0888, "1.089") == "1.089"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def relative_links(doc: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", doc.read_text()))
    links = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        links.append(target.split("#")[0])
    return links


LINK_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", LINK_DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    missing = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"
