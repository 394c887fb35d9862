"""`make setup` refuses to start a new .venv on a disk without room for it, before writing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(target: str, need_mib: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run `make TARGET NEED_MIB=...` on a copy of the Makefile in `cwd`."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, cwd / name)
    return subprocess.run(
        ["make", target, f"NEED_MIB={need_mib}"], cwd=cwd, capture_output=True, text=True
    )


def test_setup_stops_before_writing_when_the_disk_is_short(tmp_path: Path) -> None:
    need = shutil.disk_usage(tmp_path).free // 2**20 + 10**6  # a terabyte more than is free
    result = make("setup", need, tmp_path)
    assert result.returncode != 0
    assert "MiB free on" in result.stderr and f"needs about {need} MiB" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "pyproject.toml"]


def test_disk_check_passes_when_there_is_room(tmp_path: Path) -> None:
    result = make("disk-check", 1, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
