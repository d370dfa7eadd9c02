"""docs/reliability.md names the tests that hold each guarantee: every one it names exists."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests_in(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)
            and n.name.startswith("test_")}


def test_every_test_the_reliability_doc_names_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 20  # the doc does name its tests
    missing = [f"{f}::{t}" for f, t in named if not (ROOT / f).exists() or t not in _tests_in(ROOT / f)]
    assert missing == [], f"docs/reliability.md names tests that do not exist: {missing}"
