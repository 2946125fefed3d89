"""The files a package build needs, copied from the working tree (tests that build or
install fedmq from source: no .venv, caches or in-tree build leftovers)."""

from __future__ import annotations

import fnmatch
import shutil
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_sources(dest: Path) -> Path:
    """Copy pyproject.toml, README.md (and LICENSE) and every package pyproject's
    ``packages.find.include`` names into a new directory ``dest``; return it."""
    dest.mkdir()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for top in sorted(p for p in REPO.iterdir() if (p / "__init__.py").is_file()):
        # "fedmq*" means fedmq, its subpackages and fedmq_ops, as setuptools matches it
        if any(fnmatch.fnmatch(top.name, pattern) for pattern in patterns):
            shutil.copytree(top, dest / top.name, ignore=ignore)
    return dest
