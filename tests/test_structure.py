"""The shape of the code: one typed model configuration, flags read only where defined, no upward imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from main import get_args_parser
from models.config import NETWORK_FIELDS, ModelConfig
from tests.conftest import ROOT

REPO = Path(ROOT)
SOURCE_DIRS = ("models", "datasets", "util", "tools", "scripts")
TOP_LEVEL = ("main.py", "engine.py", "demo.py", "demo_web.py")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file outside tests/."""
    files = [REPO / name for name in TOP_LEVEL]
    for folder in SOURCE_DIRS:
        files += sorted((REPO / folder).rglob("*.py"))
    modules = {}
    for path in files:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports (at any depth of the file, resolved to the longest known prefix)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in candidates:
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in known:
                    names.add(".".join(parts[:i]))
                    break
            if parts[0] == "tests":
                names.add(name)
    return names


def test_model_config_defaults_are_the_parsers():
    assert ModelConfig.from_args(get_args_parser().parse_args([])) == ModelConfig()


def test_model_config_reads_only_flags_the_parser_defines():
    args = get_args_parser().parse_args([])
    del args.nheads
    with pytest.raises(AttributeError, match="nheads"):
        ModelConfig.from_args(args)


def test_checkpoint_mismatches_name_the_flags():
    weights = {"query_embed.weight": _Shape(300, 4), "transformer.encoder.layers.0.linear1.weight": _Shape(2048, 256),
               "transformer.decoder.layers.0.x": None, "transformer.decoder.norm.weight": _Shape(256),
               "text_proj.layers.0.weight": _Shape(128, 1024), "input_proj.0.1.weight": _Shape(256)}
    stored = get_args_parser().parse_args(["--nheads", "4", "--text_len", "15"])
    lines = ModelConfig().checkpoint_mismatches(weights, stored)
    assert any(line.startswith("--nheads: checkpoint 4, this run 8") for line in lines)
    assert any(line.startswith("--text_len: checkpoint 15, this run 77") for line in lines)
    assert any(line.startswith("--epochs:") and "GroupNorm" in line for line in lines)
    assert any(line.startswith("--dec_layers: checkpoint 1, this run 6") for line in lines)
    same = ModelConfig(nheads=4, text_len=15, input_proj_groupnorm=True, dec_layers=1, enc_layers=1)
    assert same.checkpoint_mismatches(weights, stored) == []
    assert set(NETWORK_FIELDS) <= {f for f in ModelConfig.__dataclass_fields__}


class _Shape:
    def __init__(self, *shape):
        self.shape = shape


def _attribute_reads(path: Path, name: str) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name}


# What init_distributed_mode and main() add to the parsed arguments.
RUN_ATTRIBUTES = {"distributed", "rank", "world_size", "gpu", "dist_backend"}


@pytest.mark.parametrize("path", ["main.py", "datasets/coco.py", "datasets/lvis.py", "datasets/__init__.py",
                                  "models/config.py", "util/run.py", "util/dist.py"])
def test_every_flag_read_from_args_is_defined(path):
    """`args.<name>` in the modules main.py hands its arguments to: every name is a flag of main.py's parser
    (a flag read but not defined would fail at run time, as `--dataset_file lvis` once did)."""
    defined = set(vars(get_args_parser().parse_args([]))) | RUN_ATTRIBUTES
    read = _attribute_reads(REPO / path, "args")
    assert read - defined == set(), f"{path} reads flags main.py does not define"


@pytest.mark.parametrize("tool", ["tools/region_prompt.py", "tools/relabel.py", "tools/pseudo_label.py"])
def test_every_tool_flag_read_is_defined(tool):
    import importlib

    module = importlib.import_module(tool[:-3].replace("/", "."))
    defined = set(vars(module.get_args_parser().parse_args([]))) | RUN_ATTRIBUTES
    read = _attribute_reads(REPO / tool, "args")
    assert read - defined == set(), f"{tool} reads flags its parser does not define"


def test_no_module_outside_tests_imports_tests():
    modules = project_modules()
    offenders = {name: sorted(i for i in imported_modules(path, set(modules)) if i.startswith("tests"))
                 for name, path in modules.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    # a package imports its own submodules to re-export them; that is not a cycle back into it
    graph = {name: {d for d in deps if not d.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep in graph and not state.get(dep):
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


def test_importing_models_does_not_import_main():
    code = "import sys, models, models.predictor, models.inference; assert 'main' not in sys.modules, 'main imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_test_modules_do_not_import_each_other():
    tests = sorted((REPO / "tests").glob("*.py"))
    shared = {"tests.golden", "tests.helpers", "tests.tiny_coco", "tests.tiny_lvis", "tests.conftest",
              "tests.emulated_cuda"}
    for path in tests:
        imported = {i for i in imported_modules(path, set()) if i.startswith("tests.")}
        stray = {i for i in imported if not any(i == s or i.startswith(s + ".") for s in shared)}
        assert not stray, f"{path.name} imports {sorted(stray)}"
