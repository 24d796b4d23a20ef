"""The house rules, checked on the source: imports only run down the layers, no import cycles, no module over
~350 lines (generated code aside), no folder with more than 12 modules side by side.

Run alone: `.venv/bin/python -m pytest tests/test_layers.py` (it parses the files, imports nothing).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "splitprune"

# Lowest first. A module may import from its own package and from any layer below its own; from another
# package of its own layer, or from a layer above, never.
LAYERS = [
    {"errors"},                                           # the core
    {"options", "files", "proto"},
    {"config", "inputs", "manifest", "flags"},            # torch-free settings and formats
    {"wire"},                                             # the wire protocol, torch-free (the device ships it)
    {"adaptive", "link"},                                 # the budget controller and link emulation, torch-free
    {"models", "data"},                                   # torch from here on
    {"compression"},
    {"training"},
    {"client", "server"},                                 # the two ends of the network runtime
    {"export", "api"},
    {"bench"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 350
MAX_MODULES_PER_FOLDER = 12
GENERATED = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name.endswith(GENERATED):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """splitprune modules `name` imports (a `from pkg import sub` of a submodule counts as that submodule)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("splitprune"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("splitprune"):
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found.update(subs or [base])
    return found


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_package_has_a_layer():
    missing = sorted({top(m) for m in modules()} - set(LAYER))
    assert not missing, f"give these a layer in LAYERS: {missing}"


def test_imports_only_run_down_the_layers():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        own = top(name)
        for target in imports(name, path, set(mods)):
            other = top(target)
            if other == own or target == "splitprune":
                continue
            if LAYER.get(other, -1) >= LAYER[own]:
                wrong.append(f"{name} imports {target} ({other} is not below {own})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    mods = modules()
    graph = {name: {t for t in imports(name, path, set(mods)) if t in mods and t != name}
             for name, path in mods.items()}
    # a package imports its own submodules when it re-exports them: that is not a cycle back up
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_modules_stay_small():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_folder_holds_more_than_twelve_modules():
    counts = defaultdict(int)
    for path in modules().values():
        if path.name != "__init__.py":
            counts[path.parent.relative_to(PACKAGE.parent)] += 1
    crowded = {str(folder): n for folder, n in counts.items() if n > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"folders with more than {MAX_MODULES_PER_FOLDER} modules: {crowded}"


def test_the_check_sees_a_wrong_import(tmp_path):
    # the rule itself can fail: a training module importing the server is reported
    fake = tmp_path / "splitprune" / "training"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from splitprune.server.app import App\n")
    found = imports("splitprune.training.x", fake / "x.py", {"splitprune.server.app"})
    assert found == {"splitprune.server.app"}
    assert LAYER[top("splitprune.server.app")] > LAYER[top("splitprune.training.x")]
