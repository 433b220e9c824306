"""The docs are part of the product: their examples run and every public name is documented."""

import importlib
import inspect
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
sys.path.insert(0, str(ROOT / "docs"))
try:
    import gen_api  # the reference generator owns the list of public modules
finally:
    sys.path.pop(0)
PUBLIC = gen_api.MODULES


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=lambda p: p.name)
def test_examples_in_page_run(page, capsys):
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(python_blocks(page.read_text())):
        try:
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"{page.name}: python block {i} raised {type(e).__name__}: {e}")


@pytest.mark.parametrize("module_name", PUBLIC)
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    missing = [
        n
        for n in module.__all__
        if not isinstance(getattr(module, n), (int, str, tuple)) and not inspect.getdoc(getattr(module, n))
    ]
    assert not missing, f"{module_name}: public names without a docstring: {missing}"


def test_public_names_are_exactly_all():
    import fnlight

    exported = {n for n in dir(fnlight) if not n.startswith("_")} - {"losses", "optim", "checkpoint", "data", "transforms"}
    undeclared = sorted(n for n in exported if n not in fnlight.__all__ and not inspect.ismodule(getattr(fnlight, n)))
    assert not undeclared, f"fnlight exposes names missing from __all__: {undeclared}"


def test_api_reference_is_current():
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == gen_api.render(), "docs/api.md is out of date: run `python docs/gen_api.py`"
    for module_name in PUBLIC:
        for name in importlib.import_module(module_name).__all__:
            assert f"### `{module_name}.{name}`" in current


@pytest.mark.parametrize("module_name", PUBLIC)
def test_every_public_function_has_a_runnable_example(module_name):
    # STYLE.md: a docstring ends with a short runnable example; --doctest-modules runs it
    module = importlib.import_module(module_name)
    missing = [
        n for n in module.__all__ if inspect.isfunction(getattr(module, n)) and ">>>" not in inspect.getdoc(getattr(module, n))
    ]
    assert not missing, f"{module_name}: public functions without a docstring example (>>>): {missing}"


def test_every_public_name_is_mentioned_in_a_guide():
    guides = "\n".join(p.read_text() for p in PAGES if p.name != "api.md")
    missing = [
        f"{module_name}.{n}"
        for module_name in PUBLIC
        for n in importlib.import_module(module_name).__all__
        if not inspect.ismodule(getattr(importlib.import_module(module_name), n))
        and not re.search(rf"\b{re.escape(n)}\b", guides)
    ]
    assert not missing, f"public names that no page of README.md or docs/ (api.md aside) mentions: {missing}"
