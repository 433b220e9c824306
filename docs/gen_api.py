"""Generate docs/api.md from the public surface's docstrings.

Run ``python docs/gen_api.py`` after changing a public name or docstring;
``tests/test_docs.py`` fails while docs/api.md is out of date.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

MODULES = (
    "fnlight",
    "fnlight.optim",
    "fnlight.losses",
    "fnlight.checkpoint",
    "fnlight.tracking",
    "fnlight.distributed",
    "fnlight.export",
    "fnlight.ensemble",
    "fnlight.finders",
    "fnlight.testing",
    "fnlight.cli",
)
HEADER = """# API reference

Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.
The concepts are explained in [concepts.md](concepts.md), the optimizers in [optim.md](optim.md).
"""


def _signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"\1", text)


def _entry(module: str, name: str, obj: object) -> str:
    kind = "module" if inspect.ismodule(obj) else "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
    if kind == "constant":
        return f"### `{module}.{name}`\n\n*constant* `{name} = {obj!r}`\n"
    doc = inspect.getdoc(obj) or ""
    if kind == "module":
        return f"### `{module}.{name}`\n\n*module* — see its own section below.\n"
    sig = _signature(obj) if kind in ("class", "function") else ""
    body = doc.split("\n>>>")[0].strip() if doc else ""
    text = f"### `{module}.{name}`\n\n*{kind}* `{name}{sig}`\n\n{body}\n"
    if kind == "class" and not issubclass(obj, (tuple, BaseException)):  # type: ignore[arg-type]
        for attr, member in vars(obj).items():
            if (attr.startswith("_") and attr != "__call__") or not inspect.isfunction(member):
                continue
            summary = (inspect.getdoc(member) or "").split("\n\n")[0].replace("\n", " ")
            text += f"\n- `{attr}{_signature(member)}` — {summary}"
        text += "\n"
    return text


def render() -> str:
    import importlib

    parts = [HEADER]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        parts.append(f"\n## `{module_name}`\n\n{(inspect.getdoc(module) or '').strip()}\n")
        for name in module.__all__:
            parts.append(_entry(module_name, name, getattr(module, name)))
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    target = pathlib.Path(__file__).with_name("api.md")
    target.write_text(render())
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
