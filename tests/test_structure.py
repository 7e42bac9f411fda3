"""The package's shape: imports run one way (no cycle, lazy imports included), each module imports on its own in a
fresh interpreter, and every module is small and says in its first line what it owns."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "grpo_math"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
MAX_LINES = 420


def package_imports(module: str) -> set[str]:
    """The grpo_math modules that ``module`` imports anywhere in its body (lazy, in-function imports too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(name.split(".")[0] for name in names if name.split(".")[0] in MODULES)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grpo_math."):
            found.add(node.module.split(".")[1])
    return found - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_one_way():
    graph = {module: package_imports(module) for module in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert "cli" not in set().union(*graph.values()), "cli only dispatches: no module may import it"


def test_every_module_imports_alone_in_a_fresh_interpreter():
    for module in MODULES:
        out = subprocess.run([sys.executable, "-c", f"import grpo_math.{module}"], capture_output=True, text=True)
        assert out.returncode == 0, f"grpo_math.{module}: {out.stderr[-1500:]}"


def test_modules_are_small_and_say_what_they_own():
    for path in PACKAGE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{path.name}: no docstring whose first line says what it owns"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.name} has {lines} lines (> {MAX_LINES}): split it by concern"


def test_commands_that_build_no_trainer_start_without_torch_or_trl():
    """``eval``, ``ask``, ``score``, ``compare``, ``report`` and ``filter`` answer ``--help`` (and parse their flags)
    without importing TRL, transformers, peft or torch: seconds of start-up a person waits for."""
    code = (
        "import sys\nfrom grpo_math.cli import main\n"
        "try:\n    main([sys.argv[1], '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('trl', 'transformers', 'peft', 'torch') if m in sys.modules))"
    )
    for command in ("eval", "ask", "score", "compare", "report", "filter"):
        out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", (command, out.stdout[-300:], out.stderr[-300:])
