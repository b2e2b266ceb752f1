"""The Method objects: the one place that knows the config's method names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fastune
from fastune.methods.method import METHODS, LoRAMethod, Method, method_from_config

PACKAGE = Path(fastune.__file__).parent
METHOD_MODULE = PACKAGE / "methods" / "method.py"
# The validator checks, with file:line, that a LoRA method has targets; it sits below
# the Method objects (config is imported by training, not the other way round).
ALLOWED = {(PACKAGE / "config" / "loader.py", "_check_lora")}


def _compares_method(node: ast.Compare) -> bool:
    """``x.method == ...``, ``name != "lora"``, ``name in ("lora", "dora")``; not the
    kernel op of the same name (``"lora" in enabled_kernels(model)``)."""
    sides = [node.left, *node.comparators]
    if any(isinstance(x, (ast.Attribute, ast.Subscript)) and _mentions_method(x) for x in sides):
        return True
    if any(isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)) for op in node.ops):
        return any(_mentions_method(x) for x in sides)
    return any(isinstance(x, (ast.Tuple, ast.List, ast.Set)) and any(_mentions_method(e) for e in x.elts)
               for x in node.comparators)


def _mentions_method(node: ast.AST) -> bool:
    """A method name as a string, ``x.method`` or ``x["method"]``."""
    if isinstance(node, ast.Constant) and node.value in METHODS:
        return True
    if isinstance(node, ast.Attribute) and node.attr == "method":
        return True
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "method"


def _method_comparisons(path: Path) -> list[str]:
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (path, node.name) in ALLOWED:
            return
        if isinstance(node, ast.Compare) and _compares_method(node):
            found.append(f"{path.name}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_the_method_name_is_compared_only_in_the_method_module():
    found = sorted(f"{path.parent.name}/{hit}" for path in PACKAGE.rglob("*.py") if path != METHOD_MODULE
                   for hit in _method_comparisons(path))
    assert found == [], f"branch on the Method object instead of its name: {found}"


def test_the_scan_sees_a_comparison(tmp_path):
    source = tmp_path / "x.py"
    source.write_text('def f(cfg, values):\n    if cfg.method == "qlora" or values["method"] in ("a",):\n'
                      '        return "lora" != cfg.name\n'
                      'def g(name, ops):\n    return name in ("lora", "dora") or "lora" in ops\n')
    # The kernel op called "lora" ("lora" in ops) is not the method.
    assert _method_comparisons(source) == ["x.py:2", "x.py:2", "x.py:3", "x.py:5"]


def _cfg(method: str, adapter_only: bool = False):
    return OmegaConf.create({"method": method, "save_adapter_weights_only": adapter_only,
                             "lora": {"targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8, "dropout": 0.0}})


def test_method_from_config():
    full = method_from_config(_cfg("full", adapter_only=True))
    assert type(full) is Method and full.lora is None and not full.export_trainable_only
    assert full.weights_dir(Path("base"), Path("ckpt")) == Path("ckpt")
    assert full.resume_weights_dir(Path("base"), Path("ckpt"), sharded_state=True) is None
    assert full.lighter_variant() is None and full.wrote("full") and not full.wrote("lora")

    lora = method_from_config(_cfg("lora", adapter_only=True))
    assert isinstance(lora, LoRAMethod) and lora.lora.rank == 4 and lora.lora.targets == ("q_proj", "v_proj")
    assert lora.export_trainable_only and not lora.nf4_base and lora.lighter_variant() == "qlora"
    assert lora.weights_dir(Path("base"), Path("ckpt")) == Path("base")
    assert lora.resume_weights_dir(Path("base"), Path("ckpt"), sharded_state=True) == Path("base")
    assert lora.describe() == "lora (rank 4, alpha 8, on q_proj, v_proj)"

    dora, qlora = method_from_config(_cfg("dora")), method_from_config(_cfg("qlora"))
    assert dora.use_dora and not dora.nf4_base and dora.lighter_variant() is None
    assert qlora.nf4_base and not qlora.use_dora and qlora.lighter_variant() is None
    with pytest.raises(ValueError, match="unknown method 'lorax'"):
        method_from_config(_cfg("lorax"))
