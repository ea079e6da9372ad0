"""The package's structure, read from its source: the imports form no circle (function-level imports
included, so none can hide one), the layers import only downwards, and no module grows past the
size a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusers_gaq"
MAX_LINES = 420

# What each layer may import from the package (besides itself). quant/ is numerics only; models/
# knows diffusers architectures; calibration/ is the method. None of them reaches up into the
# orchestration (quantize, modeling, serialization, hub, checkpointing, distributed, cli). runtime/ (the
# integer kernels and layers) builds on quant/ alone.
ALLOWED = {
    "quant": set(),
    "runtime": {"quant"},
    "models": {"quant", "config", "config_files", "precision", "presets", "class_conditional_pipeline"},
    "calibration": {"quant", "models", "config", "config_files", "precision", "presets", "digests", "files"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_form_no_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    # The check above must be able to fail: a planted circle is found.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    prefix = f"diffusers_gaq.{layer}"
    allowed = {f"diffusers_gaq.{a}" for a in ALLOWED[layer]} | {prefix}
    wrong = {}
    for name, targets in _graph().items():
        if name == prefix or name.startswith(prefix + "."):
            bad = sorted(t for t in targets if not any(t == a or t.startswith(a + ".") for a in allowed))
            if bad:
                wrong[name] = bad
    assert not wrong, f"{layer}/ reaches outside what it may use: {wrong}"


@pytest.mark.parametrize("package", ["quant", "runtime"])
def test_numerics_know_nothing_of_diffusers(package):
    def imports_diffusers(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "diffusers" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "diffusers":
                return True
        return False

    prefix = f"diffusers_gaq.{package}"
    users = [name for name, path in _modules().items()
             if (name == prefix or name.startswith(prefix + ".")) and imports_diffusers(path)]
    assert not users, f"{package}/ imports diffusers in {users}"


def test_no_module_is_over_the_size_limit():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_quantized_classes_are_defined_where_a_reader_finds_them():
    # Class statements, not classes made at import time with globals().update(...).
    tree = ast.parse((PACKAGE / "modeling.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"QuantizedUNet2DModel", "QuantizedUNet2DConditionModel", "QuantizedDiTTransformer2DModel",
            "QuantizedTransformer2DModel"} <= defined
    assert not any("globals()" in ast.unparse(n) for n in ast.walk(ast.parse((PACKAGE / "modeling.py").read_text()))
                   if isinstance(n, ast.Call))


def test_one_cli_run_finds_the_denoiser_once_and_lists_the_units_once(tmp_path, monkeypatch):
    """Every binding of denoiser_of / reconstruction_units in the package is wrapped with a counter,
    then a real (tiny) `diffusers-gaq quantize` runs in this process."""
    import sys

    from diffusers_gaq import cli, quantize  # noqa: F401 - loads the modules whose bindings are counted
    from diffusers_gaq.models import denoiser_of, wrap

    calls = {"denoiser_of": 0, "reconstruction_units": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in (("denoiser_of", denoiser_of), ("reconstruction_units", wrap.reconstruction_units)):
        for module in [m for k, m in list(sys.modules.items()) if k.startswith("diffusers_gaq") and m is not None]:
            if module.__dict__.get(name) is fn:
                monkeypatch.setattr(module, name, counted(name, fn))
    code = cli.main(["quantize", "reference", "--budget", "tiny", "--quiet", "--output", str(tmp_path / "out")])
    assert code == 0
    assert calls == {"denoiser_of": 1, "reconstruction_units": 1}
