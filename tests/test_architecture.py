"""docs/architecture.md's table of what each module may import is the rule: every import in src/fedfm (at the top of
a file or inside a function) is checked against it."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedfm"


def _rules() -> dict[str, set[str]]:
    """{module: allowed modules} from the rows between the import-rules markers."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- import-rules -->")[1].split("<!-- /import-rules -->")[0]
    rules = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        allowed = set(re.findall(r"`([\w.]+)`", cells[2]))
        for name in re.findall(r"`([\w.]+)`", cells[0]):
            rules[name] = allowed
    return rules


def _imports() -> dict[str, set[str]]:
    """{module: the fedfm modules (or names in them) it imports}, relative imports resolved."""
    out: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = mod if parts[-1] == "__init__" else mod.rsplit(".", 1)[0]
        targets = out.setdefault(mod, set())
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    if not node.module:
                        targets.update(f"{target}.{a.name}" for a in node.names)
                        continue
                else:
                    target = node.module or ""
                if target.startswith("fedfm"):
                    targets.add(target)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("fedfm"))
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _row(mod: str, rules: dict[str, set[str]]) -> str | None:
    """The most specific row covering ``mod`` (fedfm.<row> or below)."""
    rel = mod.removeprefix("fedfm.")
    covering = [r for r in rules if _under(rel, r)]
    return max(covering, key=len) if covering else None


def test_every_module_is_covered_by_a_row():
    rules = _rules()
    missing = sorted(m for m in _imports() if m != "fedfm" and _row(m, rules) is None)
    assert missing == [], f"modules with no row in docs/architecture.md's import table: {missing}"


def test_every_import_is_allowed_by_the_table():
    rules = _rules()
    broken = []
    for mod, targets in sorted(_imports().items()):
        row = _row(mod, rules)
        if row is None:
            continue
        allowed = {row} | rules[row]
        for t in sorted(targets):
            rel = t.removeprefix("fedfm.")
            if t != "fedfm" and not any(_under(rel, a) for a in allowed):
                broken.append(f"{mod} imports {t} (row `{row}` allows {sorted(rules[row])})")
    assert broken == [], "\n".join(broken)


def test_the_rules_bite():
    """The check would catch the server side reaching for data, a simulation or a model loader."""
    rules = _rules()
    for forbidden in ("data", "simulation", "tasks", "models.loader", "models.adapters", "runtime", "schedules"):
        assert not any(_under(forbidden, a) for a in rules["server"] | {"server"}), forbidden
    for forbidden in ("server", "simulation", "schedules", "data.partition"):
        assert not any(_under(forbidden, a) for a in rules["client"] | {"client"}), forbidden
    assert _row("fedfm.client.party", rules) == "client" and _row("fedfm.models.ranks", rules) == "models"
