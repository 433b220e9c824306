"""mkdocs hooks for the fnlight site (mkdocs.yml: ``hooks: [docs/reference/site_hooks.py]``).

The pages link to repository files outside ``docs/`` — ``[examples/gan.py](../examples/gan.py)`` —
which works where the Markdown is read in the repository but points outside the built site. These
hooks copy each linked file into the site under ``repo/`` and point the link there, so it works in
both places, while a link to a file that does not exist still fails the strict build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

LINK = re.compile(r"(?<!!)\[([^\]\n]*)\]\(([^)\s#]+)(#[^)\s]*)?\)")
PREFIX = "repo"


def repository_file(config: Any, page_uri: str, target: str) -> Path | None:
    """The linked file, relative to the repository root, when it exists in the repository outside the docs."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    path = ((docs / page_uri).parent / target).resolve()
    if path.is_relative_to(docs) or not path.is_relative_to(root) or not path.is_file():
        return None
    return path.relative_to(root)


def on_files(files: Files, *, config: Any) -> Files:
    root = Path(config.config_file_path).resolve().parent
    for page in [f for f in files if f.src_uri.endswith(".md") and f.abs_src_path]:
        for match in LINK.finditer(Path(page.abs_src_path).read_text(encoding="utf-8")):
            linked = repository_file(config, page.src_uri, match.group(2))
            if linked is not None and files.get_file_from_path(f"{PREFIX}/{linked.as_posix()}") is None:
                files.append(File.generated(config, f"{PREFIX}/{linked.as_posix()}", abs_src_path=str(root / linked)))
    return files


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Files) -> str:
    def repoint(match: re.Match[str]) -> str:
        linked = repository_file(config, page.file.src_uri, match.group(2))
        if linked is None:
            return match.group(0)
        up = "../" * page.file.src_uri.count("/")
        return f"[{match.group(1)}]({up}{PREFIX}/{linked.as_posix()}{match.group(3) or ''})"

    return LINK.sub(repoint, markdown)
