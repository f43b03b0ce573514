"""The README's claims that name a test: every named test exists.

The README's tables of guarantees and of clients cite tests as ``file::test`` (a bare
``::test`` continues the file named before it in the same cell). A renamed or deleted test
would leave a "yes" that nothing checks.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"`(test_\w+)?::(test_\w+)(?:\[[^\]`]*\])?`")


def cited_tests(text: str) -> list[tuple[str, str]]:
    """``(file, test)`` for each citation, line by line, table cell by table cell."""
    cited = []
    for line in text.splitlines():
        for cell in line.split("|"):
            current = None
            for match in CITATION.finditer(cell):
                current = match.group(1) or current
                assert current is not None, f"'::{match.group(2)}' names no file: {cell.strip()}"
                cited.append((current, match.group(2)))
    return cited


@functools.cache  # the README cites hundreds of tests in a few dozen files
def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_readme_names_exists() -> None:
    cited = cited_tests((ROOT / "README.md").read_text())
    assert len(cited) > 20  # the parser found the tables
    missing = []
    for file, name in cited:
        path = ROOT / "tests" / f"{file}.py"
        if not path.exists() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_a_bare_citation_continues_the_file_before_it() -> None:
    cell = "yes: `test_a::test_one` (slow), `::test_two[x]` | `test_b::test_three`"
    assert cited_tests(cell) == [
        ("test_a", "test_one"),
        ("test_a", "test_two"),
        ("test_b", "test_three"),
    ]
