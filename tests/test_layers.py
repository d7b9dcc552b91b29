"""The package's layers: no import runs up a layer or across to a peer, and no module imports
itself through others (no circles). The layer table is the one in `cached_prompts/__init__.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import cached_prompts

PACKAGE = Path(cached_prompts.__file__).parent
# From the ground up; packages on one rank are peers that must not import each other.
RANKS = {
    "errors": 0, "version": 0, "options": 1, "fs": 2, "backend": 3, "cache": 4,
    "local": 5, "server": 5, "workspace": 6, "method": 7, "commands": 8,
    "repl": 9, "report": 9, "cli": 10,
}
FACE = {"cached_prompts", "cached_prompts.__main__"}  # the library face may name any layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every cached_prompts module `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("cached_prompts"):
                found.add(node.module)
                # `from cached_prompts.fs import locks` imports the module cached_prompts.fs.locks
                found.update(f"{node.module}.{alias.name}" for alias in node.names
                             if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write `from cached_prompts.… import`")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cached_prompts"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_rank() -> None:
    packages = {layer(module) for module in graph() if module not in FACE}
    assert packages == set(RANKS), f"rank the new package(s) {packages - set(RANKS)} in RANKS and __init__.py"


def test_no_import_runs_up_a_layer_or_across_to_a_peer() -> None:
    wrong = []
    for module, targets in graph().items():
        if module in FACE:
            continue
        for target in targets:
            if target == "cached_prompts":
                wrong.append(f"{module} imports the package face; import the defining module")
                continue
            here, there = layer(module), layer(target)
            if here != there and RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def circles_in(edges: dict[str, set[str]]) -> list[str]:
    """Every circle of a module graph, as "a -> b -> a"."""
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circles() -> None:
    imports = graph()
    circles = circles_in({module: targets & set(imports) for module, targets in imports.items()})
    assert not circles, "import circles:\n" + "\n".join(circles)


BENCH = PACKAGE.parent.parent / "bench"


def bench_graph() -> dict[str, set[str]]:
    """The bench scripts import each other by bare name (bench/ is on their sys.path)."""
    scripts = {path.stem: path for path in BENCH.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in scripts.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
        edges[name] = found & set(scripts)
    return edges


def test_no_import_circles_among_the_bench_scripts() -> None:
    if not BENCH.is_dir():  # an installed package without its checkout
        return
    circles = circles_in(bench_graph())
    assert not circles, "import circles in bench/:\n" + "\n".join(circles)


def test_the_circle_check_finds_a_circle() -> None:
    assert circles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert circles_in({"a": {"b"}, "b": set()}) == []


def llama_cpp_imports(path: Path) -> list[str]:
    """The llama_cpp modules `path` imports (at module level or inside a function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [name for name in names if name == "llama_cpp" or name.startswith("llama_cpp.")]
    return found


def test_only_the_local_engine_imports_llama_cpp() -> None:
    """Every raw llama.cpp call lives in local/ (the engine wrappers own the C handles)."""
    wrong = [f"{module_name(path)} imports {', '.join(names)}" for path in sorted(PACKAGE.rglob("*.py"))
             if (names := llama_cpp_imports(path)) and layer(module_name(path)) != "local"]
    assert not wrong, "llama_cpp outside local/:\n" + "\n".join(wrong)


def test_the_checks_see_a_wrong_import(tmp_path: Path) -> None:
    """The parser finds function-level imports, so a lazy import cannot hide a wrong arrow."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from cached_prompts.cli.main import main\n", encoding="utf-8")
    assert imports_of(source) == {"cached_prompts.cli.main"}
    source.write_text("def f():\n    from llama_cpp.llama_grammar import json_schema_to_gbnf\n    import llama_cpp\n",
                      encoding="utf-8")
    assert llama_cpp_imports(source) == ["llama_cpp.llama_grammar", "llama_cpp"]
