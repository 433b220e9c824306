"""The benchmark suite (benchmarks/suite.py): the generated section of docs/benchmarks.md.

No wall-clock assertions: only that the suite runs, rewrites the section between its markers,
keeps everything outside them, and prints ratios.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "benchmarks" / "suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


suite = _load_suite()
BEGIN, END = suite.BEGIN, suite.END


def _lightning_importable() -> bool:
    return importlib.util.find_spec("lightning") is not None


def test_replace_section_keeps_what_lies_outside_the_markers() -> None:
    doc = f"# B\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Analysis\n\nhand-written\n"
    new = suite.replace_section(doc, f"{BEGIN}\nnew\n{END}")
    assert new == f"# B\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## Analysis\n\nhand-written\n"
    assert suite.replace_section(new, f"{BEGIN}\nnew\n{END}") == new  # idempotent


def test_replace_section_appends_when_there_are_no_markers() -> None:
    assert suite.replace_section("# B\n\ntext\n", f"{BEGIN}\nx\n{END}") == f"# B\n\ntext\n\n{BEGIN}\nx\n{END}\n"


@pytest.mark.parametrize(
    "doc",
    [f"{BEGIN}\n{BEGIN}\n{END}\n", f"{BEGIN}\nx\n", f"{END}\nx\n{BEGIN}\n", f"{BEGIN}\n{END}\n{END}\n"],
    ids=["two begins", "no end", "end first", "two ends"],
)
def test_replace_section_refuses_broken_markers(doc: str) -> None:
    with pytest.raises(ValueError, match="fix the markers by hand"):
        suite.replace_section(doc, f"{BEGIN}\nx\n{END}")


def _part(name: str, body: str) -> str:
    return f"<!-- suite:part name={name} date=2026-01-02T03:04Z mode=full status=ok seconds=12 -->\n### {name}\n\n{body}"


def test_a_run_of_some_scripts_keeps_the_other_parts() -> None:
    sw = {"torch": "2.13.0", "python": "3.11", "lightning": "not installed", "threads": "1", "cuda": "", "commit": "abc"}
    kw = {"quick": False, "started": suite.datetime.datetime(2026, 2, 3, 4, 5), "load": ("1", "1"), "label": None, "sw": sw}
    old = suite.build_section({"ensemble": _part("ensemble", "| e | 3.00x |"), "peers": _part("peers", "old")}, **kw)
    doc = f"# B\n\n{old}\n\nanalysis\n"
    parts = suite.parse_parts(doc)
    assert parts == {"peers": _part("peers", "old"), "ensemble": _part("ensemble", "| e | 3.00x |")}
    parts["peers"] = _part("peers", "new")
    new = suite.replace_section(doc, suite.build_section(parts, **kw))
    assert "| e | 3.00x |" in new and "new" in new and "old" not in new and new.endswith("\n\nanalysis\n")
    assert new.index("### peers") < new.index("### ensemble")  # the suite's order, not the order of the runs
    assert "| `ensemble.py` | K sequential fnlight runs | 2026-01-02 03:04 | ok | 12 s |" in new


@pytest.mark.parametrize("doc", ["# B\n", f"# B\n{BEGIN}\n{END}\n", f"{BEGIN}\nno parts\n{END}"])
def test_no_parts_yet(doc: str) -> None:
    assert suite.parse_parts(doc) == {}


def test_demote_headings_skips_code_fences() -> None:
    md = "## Top\n\n```text\n# not a heading\n```\n\n### Sub\n"
    assert suite.demote_headings(md, top=4) == "#### Top\n\n```text\n# not a heading\n```\n\n##### Sub"


def test_quick_suite_rewrites_the_section_of_a_copy_of_the_docs(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    assert original.count(BEGIN) == 1 and original.count(END) == 1, "docs/benchmarks.md must hold the suite's markers"
    doc.write_text(original)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick", "--only", "peers", "--output", str(doc)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    text = doc.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    before, rest = text.split(BEGIN)
    section, after = rest.split(END)
    assert before == original.split(BEGIN)[0] and after == original.split(END)[1]  # the hand-written parts are kept
    kept = {name: part for name, part in suite.parse_parts(original).items() if name != "peers"}
    assert all(part in section for part in kept.values())  # the other scripts' parts from the last full run
    for expected in ("## Latest suite run (a --quick smoke run", "- **Date**:", "- **Machine**:", "- **Device**:", "### peers"):
        assert expected in section
    assert "torch " in section and "logical CPUs" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "(b) hand loop, AdamW fused" in line]
    assert rows, section
    assert all(re.search(r"\| \d+\.\d{3}x", row) for row in rows), rows  # ratios to the reference, printed
    assert "| 1.000x |" in section  # the reference against itself
    assert re.search(r"\d+\.\d{3}x \[\d+\.\d{3}-\d+\.\d{3}\]", section)  # paired ratios with their spread
    if not _lightning_importable():
        assert "`lightning` is not importable here" in section
    assert "vs (b)" in proc.stdout and "wrote the generated section" in proc.stdout
    assert "peak tensors MiB" in section and "tensor memory live at once" in section  # the second memory measure
