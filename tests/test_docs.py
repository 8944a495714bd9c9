"""The documentation builds without warnings, and the API page lists every public name."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SUBMODULES = ["pp", "tl", "pl", "datasets", "io", "metrics", "model"]


@pytest.mark.parametrize("name", SUBMODULES)
def test_api_page_lists_every_public_name(name):
    module = importlib.import_module(f"histoclip.{name}")
    listed = set(re.findall(r"^\s+([a-z_]+\.[A-Za-z_][A-Za-z0-9_]*)\s*$", (DOCS / "api.md").read_text(), re.M))
    missing = [n for n in module.__all__ if f"{name}.{n}" not in listed]
    assert not missing, f"docs/api.md does not list {missing} of histoclip.{name}.__all__"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    pytest.importorskip("sphinx_book_theme")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
           str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert (tmp_path / "html" / "api.html").is_file()
    assert (tmp_path / "html" / "tutorials" / "domains_dlpfc.html").is_file()
