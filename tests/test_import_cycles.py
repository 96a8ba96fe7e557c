"""No import circle anywhere in src/exfilguard: a module never imports, directly or through others,
a module that imports it back (packages' __init__ included: `from pkg import name` imports pkg)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> exfilguard modules it imports (anywhere in it, function bodies too).

    `from pkg import sub` counts as importing pkg.sub when sub is a module, else as importing pkg
    (its __init__). The implicit import of a submodule's parent package is left out: Python runs
    a package's __init__ before its submodules, so that edge closes no circle that can fail.
    """
    files = {_module(p): p for p in (SRC / "exfilguard").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("exfilguard")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("exfilguard") and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in files else node.module)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def _cycles(graph: dict[str, set[str]], within: tuple[str, ...]) -> list[list[str]]:
    nodes = {m for m in graph if m.startswith(within)}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m] & nodes):
            if state.get(d) == 1:
                found.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(nodes):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycles_anywhere():
    assert _cycles(_graph(), ("exfilguard",)) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"exfilguard.codec.a": {"exfilguard.codec.b"}, "exfilguard.codec.b": {"exfilguard.codec.a"}}, ("exfilguard",))


def test_the_checker_sees_a_cycle_through_a_package():
    # ledger/__init__ imports store; store doing `from exfilguard.ledger import open_ledger` closes a circle
    graph = {"exfilguard.ledger": {"exfilguard.ledger.store"}, "exfilguard.ledger.store": {"exfilguard.ledger"}}
    assert _cycles(graph, ("exfilguard",))
