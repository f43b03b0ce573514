"""Under CI, a missing optional dependency fails the run instead of silently dropping tests.

The hooks live in tests/conftest.py; here they run in a fresh pytest process on a scratch
directory holding a copy of that conftest, once with ``CI`` set and once without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

MODULE_LEVEL = """
import pytest
pytest.importorskip("tram_no_such_module")

def test_never_collected():
    pass
"""
IN_A_TEST = """
import pytest

def test_needs_a_module():
    pytest.importorskip("tram_no_such_module")

def test_needs_a_gpu():
    pytest.skip("needs CUDA")

def test_runs():
    pass
"""


def run_pytest(directory: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    (directory / "pytest.ini").write_text("[pytest]\n")  # not the repository's settings
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(directory)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    return tmp_path


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_module_level_importorskip_is_an_error_under_ci(scratch: Path, ci: str) -> None:
    (scratch / "test_optional.py").write_text(MODULE_LEVEL)
    result = run_pytest(scratch, ci)
    assert result.returncode != 0, result.stdout
    assert "ERROR test_optional.py" in result.stdout
    assert "could not import 'tram_no_such_module'" in result.stdout
    assert "declare the package in the right extra" in result.stdout


@pytest.mark.parametrize("ci", [None, "0", "false"])
def test_outside_ci_the_module_is_skipped(scratch: Path, ci: str | None) -> None:
    (scratch / "test_optional.py").write_text(MODULE_LEVEL)
    result = run_pytest(scratch, ci)
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout
    assert "1 skipped" in result.stdout


def test_under_ci_only_importorskip_inside_a_test_fails(scratch: Path) -> None:
    (scratch / "test_optional.py").write_text(IN_A_TEST)
    result = run_pytest(scratch, "true")
    assert result.returncode == 1, result.stdout
    assert "FAILED test_optional.py::test_needs_a_module" in result.stdout
    assert "SKIPPED [1] test_optional.py" in result.stdout  # the CUDA skip stays a skip
    assert "1 failed, 1 passed, 1 skipped" in result.stdout
    local = run_pytest(scratch, None)
    assert local.returncode == 0, local.stdout
    assert "1 passed, 2 skipped" in local.stdout
