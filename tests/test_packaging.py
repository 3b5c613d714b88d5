"""The installed project exposes one import name, ``mpn_dqn``: every source package of the
checkout is listed under it in pyproject.toml, and the code imports only through it."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("actors", "common", "driver", "learner", "replay")


def test_every_source_package_is_installed_under_mpn_dqn():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"mpn_dqn"} | {"mpn_dqn." + ".".join(p.parent.relative_to(ROOT).parts)
                             for f in FOLDERS for p in (ROOT / f).rglob("__init__.py")}
    assert set(setup["packages"]) == on_disk
    assert {k: v for k, v in setup["package-dir"].items()} == {"mpn_dqn": "mpn_dqn",
                                                               **{f"mpn_dqn.{f}": f for f in FOLDERS}}
    assert "py-modules" not in setup                      # no generic top-level module (main)


@pytest.mark.parametrize("folder", FOLDERS + ("tests", "deploy"))
def test_code_imports_the_project_only_as_mpn_dqn(folder):
    bare = re.compile(r"^\s*(from|import) (" + "|".join(FOLDERS) + r")[\.\s]", re.M)
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if bare.search(p.read_text())]
    assert hits == []
