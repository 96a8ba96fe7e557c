"""The meter's trusted base, measured: every file of the package that `exfilguard meter` imports to
forward a byte (static imports, function bodies included, with the packages they run), and its size.

Run it as a script to print the table that docs/meter.md starts with:
``python tests/meter/test_trusted_base.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
ROOTS = ("exfilguard.meter",)  # every module of the meter package is in (see _closure)
MAX_LINES = 3100  # the whole base: 3,091 (4,314 in 20 files before issue 21, 3,475 before its last split; it asks for <= 2,000)
MAX_FILE = 500
# Governance and audit: imported by the CLI, never by the meter. And what was split off the base so that
# it stays off: the row reads (ledger/reads.py), key files (keytools.py), the error tree beyond the
# base's errors (errors.py; the base imports base_errors.py), the command-line value parsers (units.py).
NEVER = ("exfilguard.ledger.approvals", "exfilguard.ledger.apikeys", "exfilguard.ledger.checkpoint",
         "exfilguard.ledger.proofs", "exfilguard.ledger.verify", "exfilguard.ledger.merkle_proofs",
         "exfilguard.ledger.reads", "exfilguard.ledger.keytools", "exfilguard.errors", "exfilguard.units")


def _file(mod: str) -> Path | None:
    p = SRC / mod.replace(".", "/")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _imports(mod: str) -> set[str]:
    """exfilguard modules `mod` imports anywhere in it, with every package above each (Python runs their __init__)."""
    path = _file(mod)
    assert path is not None, mod
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {m for m in out if m.startswith("exfilguard") and _file(m) is not None}


def trusted_base() -> dict[str, int]:
    """module -> line count, for everything the meter package imports from exfilguard."""
    roots = set(ROOTS) | {f"exfilguard.meter.{p.stem}" for p in (SRC / "exfilguard/meter").glob("*.py") if p.stem != "__init__"}
    seen: set[str] = set()
    todo = sorted(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_imports(m) - seen)
    return {m: len(_file(m).read_text().splitlines()) for m in sorted(seen)}  # type: ignore[union-attr]


def test_trusted_base_is_small():
    base = trusted_base()
    total = sum(base.values())
    assert total <= MAX_LINES, f"the meter's trusted base grew to {total} lines in {len(base)} files"
    assert not [m for m, n in base.items() if n > MAX_FILE], f"files over {MAX_FILE} lines"


def test_governance_is_not_in_the_trusted_base():
    assert not set(trusted_base()) & set(NEVER)


def test_the_count_sees_imports_in_function_bodies(tmp_path, monkeypatch):
    pkg = tmp_path / "exfilguard" / "meter"
    pkg.mkdir(parents=True)
    (tmp_path / "exfilguard" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from exfilguard import b\n")
    (tmp_path / "exfilguard" / "b.py").write_text("x = 1\ny = 2\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert trusted_base() == {"exfilguard": 0, "exfilguard.b": 2, "exfilguard.meter": 0, "exfilguard.meter.a": 2}


if __name__ == "__main__":
    base = trusted_base()
    print("| file | lines |\n| --- | --- |")
    for m, n in base.items():
        print(f"| {_file(m).relative_to(SRC)} | {n} |")  # type: ignore[union-attr]
    print(f"| **{len(base)} files** | **{sum(base.values())}** |")
