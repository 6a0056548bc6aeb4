"""The installable package: every sub-package and the model card template ship in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_wheel_ships_every_package_and_the_card_template(tmp_path):
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "robustcl").rglob("__init__.py")} | {
        "robustcl.hub_cards"
    }
    assert listed == on_disk, "pyproject.toml [tool.setuptools] packages must list every robustcl package"

    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("robustcl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "robustcl/hub_cards/robustcl_model_card.md" in names
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "robustcl").rglob("*.py")}
    assert expected <= names
