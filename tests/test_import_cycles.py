"""The registries import their parts, never the reverse: no import circle in codec/, models/, cli/."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> exfilguard modules it imports (anywhere in it, function bodies too), packages'
    __init__ modules left out (they re-export; `from pkg import sub` counts as importing pkg.sub)."""
    files = {_module(p): p for p in (SRC / "exfilguard").rglob("*.py")}
    packages = {_module(p) for p in (SRC / "exfilguard").rglob("__init__.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        if mod in packages:
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("exfilguard")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("exfilguard") and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in files else node.module)
        graph[mod] = {d for d in deps if d in files and d not in packages and d != mod}
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


def test_no_import_cycles_in_codec_models_and_cli():
    cycles = _cycles(_graph(), ("exfilguard.codec.", "exfilguard.models.", "exfilguard.cli."))
    assert cycles == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"exfilguard.codec.a": {"exfilguard.codec.b"}, "exfilguard.codec.b": {"exfilguard.codec.a"}}, ("exfilguard.codec.",))
