"""The mutation catalogue (``tests/mutation/run_mutants.py``) still applies to the code.

Each mutant replaces one line it expects to find exactly once; a refactor that moves or rewrites
that line makes the mutant stale, and ``run_mutants.py`` stops at it. This fast check names
every stale mutant in CI, where the (slow) mutation run itself does not go.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutant_finds_its_line_once(monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location(
        "run_mutants", ROOT / "tests" / "mutation" / "run_mutants.py"
    )
    assert spec is not None
    assert spec.loader is not None
    catalogue = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_mutants", catalogue)  # dataclasses look it up there
    spec.loader.exec_module(catalogue)
    assert len(catalogue.MUTANTS) > 100
    names = [mutant.name for mutant in catalogue.MUTANTS]
    assert len(names) == len(set(names)), "two mutants share a name"
    stale = [problem for mutant in catalogue.MUTANTS if (problem := mutant.stale(ROOT))]
    assert not stale, "\n".join(stale)
