"""The package's shape, read from its source with `ast` (nothing is imported): layers, circles, where `cfg` goes."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robust_cli"

# bottom to top, as robust_cli/__init__.py's docstring lists them; a module may import its own layer and those before it
LAYERS = ("core", "attacks", "defenses", "training", "analysis", "evaluation", "results", "commands", "cli")
BELOW_COMMANDS = LAYERS[: LAYERS.index("commands")]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of `robust_cli.<layer>...`; the package root (its version, the moved-module table) is below all."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return "cli" if parts[1] in ("cli", "__main__") else parts[1]


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict) -> list[tuple[int, str]]:
    """(line, module) of every import of a package module in the file, anywhere in it (also inside functions)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "robust_cli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "robust_cli":
                continue
            for alias in node.names:  # `from robust_cli.core import store` imports the module robust_cli.core.store
                found.append((node.lineno, f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target))
    return found


def test_the_layers_exist_and_the_package_docstring_lists_them_in_order():
    import robust_cli

    doc = robust_cli.__doc__
    positions = [doc.index(f"`{layer}/`" if layer != "cli" else "`cli.py`") for layer in LAYERS]
    assert positions == sorted(positions)
    for layer in LAYERS[:-1]:
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
    stray = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "cli.py")]
    assert not stray, f"modules outside the layers: {stray}"


def test_no_import_goes_from_a_lower_layer_to_a_higher_one():
    modules = package_modules()
    upward = []
    for module, path in modules.items():
        layer = layer_of(module)
        for line, target in imports_of(path, modules):
            target_layer = layer_of(target)
            if layer is None and target_layer is not None:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (the package root imports no layer)")
            elif layer is not None and target_layer is not None and LAYERS.index(target_layer) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer}) imports {target} ({target_layer})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    modules = package_modules()
    graph = {m: {t for _, t in imports_of(p, modules) if t in modules and t != m} for m, p in modules.items()}
    # a package's __init__ that re-exports its modules is part of them: `robust_cli.attacks` -> `robust_cli.attacks.apgd`
    # is not a circle when apgd imports `robust_cli.attacks.base`; only edges between different modules count
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_composed_config_stops_at_the_commands():
    """Below commands/, functions take the values they use: no parameter named cfg, none annotated DictConfig."""
    offenders = []
    for module, path in package_modules().items():
        if layer_of(module) not in BELOW_COMMANDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                for arg in args:
                    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                    if arg.arg == "cfg" or "DictConfig" in annotation:
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}({arg.arg})")
    assert not offenders, "functions below commands/ that take the composed config:\n" + "\n".join(offenders)


@pytest.mark.parametrize("old, new", [("persistence", "analysis.persistence"), ("train", "training.loop"), ("store", "core.store")])
def test_old_import_paths_still_work_and_say_where_the_module_went(old, new):
    import importlib
    import sys

    sys.modules.pop(f"robust_cli.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"robust_cli.{old} moved to robust_cli.{new}"):
        moved = importlib.import_module(f"robust_cli.{old}")
    assert moved is importlib.import_module(f"robust_cli.{new}")


def test_checkpoint_keys_hash_the_targets_under_their_names_before_the_move():
    import robust_cli

    assert robust_cli.historical_name("robust_cli.core.models.MLP") == "robust_cli.models.MLP"
    assert robust_cli.historical_name("robust_cli.core.data.Digits") == "robust_cli.data.Digits"
    assert robust_cli.historical_name("robust_cli.defenses.trades.TRADES") == "robust_cli.defenses.trades.TRADES"
    assert robust_cli.historical_name("robust_cli.core.modelsX") == "robust_cli.core.modelsX"


def test_every_module_imports():
    """A name moved between modules and not followed (pyflakes cannot see across modules) fails here, not in a run."""
    import importlib

    for module in package_modules():
        if not module.endswith("__main__"):
            importlib.import_module(module)
