"""A griffe extension for the API reference: fnlight's docstrings, rendered as Markdown.

fnlight's docstrings are Google style with two habits that Markdown renders badly, so this
rewrites the docstring text (for the site only; the library is untouched) before griffe parses it:

- bare doctests (``>>>`` lines and their output) become ``pycon`` code blocks; left as text,
  ``>>>`` would be a nested block quote and ``[1.0, 0.5]`` output lines would be taken for
  Markdown reference links;
- rST roles (``:func:`with_amp```, ``:class:`TrainState```) become code spans;
- ``Fields:`` (the dataclass and named-tuple field lists) becomes ``Attributes:``, the Google
  section griffe renders as a table.

mkdocs.yml loads it with ``extensions: [docs/reference/griffe_fnlight.py]``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`~?([^`]+)`")
DOCTEST_FLAG = re.compile(r"\s*#\s*doctest:.*$")


def fence_doctests(text: str) -> str:
    """Wrap every run of doctest lines (a ``>>>`` line up to the next blank line) in a pycon fence."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            out.append(DOCTEST_FLAG.sub("", lines[i]))
            i += 1
        out.append(f"{indent}```")
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """The docstring text as the site renders it (see the module docstring)."""
    text = ROLE.sub(r"`\1`", text)
    text = re.sub(r"^(\s*)Fields:$", r"\1Attributes:", text, flags=re.M)
    return fence_doctests(text)


class FnlightDocstrings(griffe.Extension):
    """Rewrite each docstring once the object tree is built, before anything parses it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
