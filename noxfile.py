"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s docs``, ``nox -s bench``.

Every session installs torch first, pinned by the ``FNLIGHT_TORCH`` environment variable
(default ``torch==2.13.0``): asking pip for an open torch range with no torch installed
downloads the newest CUDA build, several GB.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("FNLIGHT_TORCH", "torch==2.13.0")


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (unit, parity, doctests and docs examples)."""
    install(session, "dev")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the library, tests, examples and benchmarks."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "fnlight", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site (mkdocs, warnings are errors) and check the docs: examples run, every public name is documented."""
    install(session, "docs,dev")
    site = os.path.join(session.create_tmp(), "site")
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})
    tests = ("tests/test_docs.py", "tests/test_site.py")
    session.run("python", "-m", "pytest", "-q", *tests, *session.posargs, env={"FNLIGHT_SITE": site})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmark suite; it rewrites the generated section of docs/benchmarks.md.

    Lightning is installed here only (the Trainer and Fabric columns of benchmarks/peers.py),
    with torch pinned again so that pip keeps the torch installed first. Arguments after
    ``--`` go to benchmarks/suite.py (``--quick --output /tmp/b.md``, ``--only peers``...).
    """
    install(session, "examples,aim,dev")
    session.install("lightning>=2.5,<2.7", TORCH)
    session.run("python", "benchmarks/suite.py", *session.posargs)
