"""The docs site: every page is in the nav, every public name is rendered, the strict build passes.

The site is built with ``mkdocs build --strict`` (warnings are errors) into a temporary directory,
or taken from ``$FNLIGHT_SITE`` when ``nox -s docs`` has just built it. The ``dev`` extra (what
``nox -s tests`` installs) includes mkdocs, so CI builds the site; without mkdocs the build tests
are skipped; the nav and reference-page checks need only PyYAML.
"""

import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest
from test_docs import PUBLIC

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", flags=re.M)


def nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages: list[str] = []

    def walk(entry: object) -> None:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for item in entry.values():
                walk(item)

    walk(config["nav"])
    return pages


def reference_pages() -> dict[str, pathlib.Path]:
    """Module name -> the reference page whose first ``::: module`` directive renders it."""
    pages = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        found = DIRECTIVE.findall(page.read_text())
        if found:
            pages[found[0]] = page
    return pages


def test_every_page_is_in_the_nav():
    listed = nav_pages()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(pages - set(listed))
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"
    absent = sorted(set(listed) - pages)
    assert not absent, f"mkdocs.yml's nav lists pages that do not exist: {absent}"
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"


def test_every_public_module_has_a_reference_page():
    pages = reference_pages()
    missing = [m for m in PUBLIC if m not in pages]
    assert not missing, f"public modules without a docs/reference/*.md page (`::: module`): {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    if os.environ.get("FNLIGHT_SITE"):
        built = pathlib.Path(os.environ["FNLIGHT_SITE"]).resolve()
        assert (built / "index.html").is_file(), f"FNLIGHT_SITE={built} holds no built site"
        return built
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs site needs the docs extra: pip install -e '.[docs]'")
    built = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml", "--site-dir", str(built)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}{result.stderr[-6000:]}"
    return built


def test_reference_renders_every_public_name(site):
    pages = reference_pages()
    missing = []
    for module_name in PUBLIC:
        html = (site / "reference" / pages[module_name].stem / "index.html").read_text()
        anchors = set(re.findall(r'id="([^"]+)"', html))
        for name in importlib.import_module(module_name).__all__:
            target = f"{module_name}.{name}"
            if inspect.ismodule(getattr(importlib.import_module(module_name), name)):
                if f'href="../{pages[target].stem}/"' not in html:
                    missing.append(f"{target} (no link to its page)")
            elif target not in anchors:
                missing.append(target)
    assert not missing, f"public names the API reference does not render (no docstring?): {missing}"


@pytest.mark.parametrize(
    ("page", "image"),
    [
        ("index.html", "images/aim_digits_run.png"),
        ("tracking/index.html", "images/aim_digits_run.png"),
        ("finders/index.html", "images/lr_finder.png"),
        ("recipes/index.html", "images/lr_finder.png"),
    ],
)
def test_pages_show_the_screenshots(site, page, image):
    html = (site / page).read_text()
    assert re.search(rf'<img [^>]*src="(\.\./)?{re.escape(image)}"', html), f"{page} does not show {image}"
    assert (site / image).is_file()
