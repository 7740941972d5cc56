"""The import direction of docs/architecture.md ("Layers"), checked on the source.

Every ``import`` statement of every module under evr1/ (top-level and function-local ones,
read with ``ast``, not by importing anything) must name a module of the same layer or a lower
one. A function-local import is allowed only for an optional heavy dependency (vLLM,
megatron-core, DALI, ...: ``OPTIONAL_HEAVY``), with a comment on its line or the line above
saying so. A failure names the importing file, the line and what it may not import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: a module may import its own layer and those before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("evr1", "evr1.config", "evr1.files", "evr1.leases", "evr1.runs", "evr1.tasks")),
    ("media", ("evr1.video",)),
    ("rewards", ("evr1.rewards",)),
    ("data", ("evr1.data",)),
    ("models", ("evr1.models",)),
    ("rollout", ("evr1.rollout",)),
    ("train", ("evr1.train",)),
    ("eval", ("evr1.eval",)),
    ("pipeline", ("evr1.pipeline",)),
    ("cli", ("evr1.cli",)),
]

# Optional heavy dependencies (not installed everywhere, or slow to import and needed by one
# path only): the only things a function may import locally. Names are top-level packages,
# or evr1 modules that exist to wrap one of them.
OPTIONAL_HEAVY = (
    "vllm", "megatron", "transformer_engine", "nvidia", "wandb", "matplotlib", "math_verify",
    "rouge_score", "jiwer", "pyarrow",
    # transformers' Qwen-VL processors need torchvision, absent from the text-only vLLM venv
    "transformers.models.qwen2_vl", "transformers.models.qwen3_vl",
    "transformers.Qwen2_5_VLProcessor", "transformers.Qwen3VLProcessor",
    "evr1.rollout.vllm", "evr1.train.backends.megatron",
)

# Files allowed to break the order for now, each with the reason (a file another branch is
# moving). Empty since the preprocess task body went to evr1/data/preprocess.py and curation
# to evr1/pipeline/curate.py (issue 18, item 4).
KNOWN_VIOLATIONS: set[str] = set()


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a dotted evr1 module name (the longest matching prefix)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, package: str) -> list[str]:
    """The dotted names an import statement reads (``from a import b``: ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:  # relative: from the package of the importing module
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def local_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements inside a function (at any depth)."""
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
    return found


def sources() -> list[Path]:
    return sorted((ROOT / "evr1").rglob("*.py"))


def violations(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = layer_of(name)
    assert own is not None, f"{rel}: in no layer of tests/test_layers.py (add it there)"
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), filename=rel)
    local = {id(n) for n in local_imports(tree)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        targets = imported_modules(node, package)
        for target in targets:
            layer = layer_of(target)
            if layer is not None and layer > own:
                found.append(f"{rel}:{node.lineno}: layer {LAYERS[own][0]} imports {target} "
                             f"(layer {LAYERS[layer][0]})")
                break
        if id(node) in local:
            heavy = any(t == h or t.startswith(h + ".") for t in targets[:1] + targets[-1:]
                        for h in OPTIONAL_HEAVY)
            # The comment is on the import's line or above the block of imports it opens.
            above = node.lineno - 2
            while above >= 0 and lines[above].lstrip().startswith(("from ", "import ")):
                above -= 1
            near = lines[node.lineno - 1] + (lines[above] if above >= 0 else "")
            if not heavy:
                found.append(f"{rel}:{node.lineno}: function-local import of {targets[-1]} "
                             "(move it to the top of the file; only optional heavy "
                             "dependencies are imported where they are used)")
            elif "#" not in near:
                found.append(f"{rel}:{node.lineno}: function-local import of {targets[-1]} "
                             "without a comment saying why it is local")
    return found


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    problems = []
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        found = violations(path)
        if rel in KNOWN_VIOLATIONS:
            continue
        problems += found
    assert not problems, "imports against the layer order (docs/architecture.md, Layers):\n" + \
        "\n".join(problems)


def test_known_violations_are_still_there():
    """An entry that no longer violates (the file moved or was fixed) must leave the list."""
    for rel in KNOWN_VIOLATIONS:
        path = ROOT / rel
        if path.exists():
            assert violations(path), f"{rel} is clean now: remove it from KNOWN_VIOLATIONS"


def test_no_import_cycles_between_modules():
    """Module-level cycles inside a layer (e.g. a dispatcher and its backends importing each
    other) are what the layers cannot see; top-level imports only (a local import of an
    optional dependency runs after both modules are loaded)."""
    names = {module_name(p): p for p in sources()}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        local = {id(n) for n in local_imports(tree)}
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in local:
                continue
            targets = imported_modules(node, package)
            if isinstance(node, ast.ImportFrom):  # `from pkg import mod` reads pkg.mod only
                *names_read, base = targets
                targets = [t if t in names else base for t in names_read]
            edges |= {t for t in targets if t in names and t != name}
        graph[name] = edges
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_checker_finds_a_violation(tmp_path):
    """The checker itself: an upward import, a bare local import, a commented heavy one."""
    bad = ROOT / "evr1" / "train" / "_layer_probe.py"
    bad.write_text("from evr1.pipeline import stages\n\n\ndef f():\n    import json\n\n\n"
                   "def g():\n    # optional heavy dependency\n    import vllm\n")
    try:
        found = violations(bad)
    finally:
        bad.unlink()
    assert found == [
        "evr1/train/_layer_probe.py:1: layer train imports evr1.pipeline.stages (layer "
        "pipeline)",
        "evr1/train/_layer_probe.py:5: function-local import of json (move it to the top of "
        "the file; only optional heavy dependencies are imported where they are used)"]


def test_no_slurm_inside_train():
    """The training layer runs anywhere: Slurm commands and submitit live in evr1/pipeline/
    (and evr1/leases.py's one squeue); the trainer is given what it needs (evr1.train.hooks)."""
    slurm = {"squeue", "scontrol", "sbatch", "srun", "scancel", "sacct"}
    problems = []
    for path in sorted((ROOT / "evr1" / "train").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in slurm:
                problems.append(f"{rel}:{node.lineno}: runs {node.value}")
            if isinstance(node, ast.Import | ast.ImportFrom) and any(
                    t.split(".")[0] == "submitit" for t in imported_modules(node, "")):
                problems.append(f"{rel}:{node.lineno}: imports submitit")
    assert not problems, "\n".join(problems)
