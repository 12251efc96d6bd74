"""The contract between the reference and the ports (SPEC.md#backends, reference/contract.py).

- No file under fast/ imports an underscore name from reference/ or reads one off a reference
  module: what a port needs is public (reference/contract.py, or a public name of its module).
- The model driver exists once: no file under fast/ defines a function of the driver.
- The reference modules the GPU port executes over CuPy (fast/gpu/namespace.py MODULES) keep the
  CuPy-safety rule written at the top of each: NumPy only through the name ``np``.
- One driver, three ops: the ports' model APIs are the reference's functions with their ops.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
from tolerances import assert_close

from nlref.fast.cpu import model as cpu_model
from nlref.fast.gpu import namespace
from nlref.reference import blocks, contract
from nlref.reference import model as driver
from nlref.reference.config import preset

ROOT = Path(__file__).resolve().parents[2]
FAST = sorted((ROOT / "fast").rglob("*.py"))
REFERENCE_PKG = "nlref.reference"


def _reference_aliases(tree: ast.Module, path: Path) -> tuple[set[str], list[str]]:
    """(names bound to reference modules in this file, the underscore names it imports from reference/)."""
    package = "nlref." + ".".join(path.relative_to(ROOT).parent.parts)
    aliases, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if not module.startswith(REFERENCE_PKG):
                continue
            for a in node.names:
                if a.name.startswith("_"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {module} import {a.name}")
                if module == REFERENCE_PKG or not a.name[:1].isupper():
                    aliases.add(a.asname or a.name)  # a module, or a function (harmless: no attributes read)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(REFERENCE_PKG):
                    aliases.add(a.asname or a.name)
    return aliases, bad


def test_no_port_file_uses_an_underscore_name_of_the_reference():
    bad = []
    for path in FAST:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases, found = _reference_aliases(tree, path)
        bad += found
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "the ports use private names of the reference (make them public):\n" + "\n".join(bad)


def test_the_check_sees_a_planted_private_import(tmp_path):
    """The grep above is not vacuous: a planted private import and attribute are found."""
    fake = ROOT / "fast" / "cpu" / "planted.py"
    tree = ast.parse("from ...reference.model import _hidden\nfrom ...reference import cms as R\nR._level(1)\n")
    aliases, found = _reference_aliases(tree, fake)
    assert found and "R" in aliases


DRIVER_FUNCTIONS = {name for mod in (driver, blocks) for name, f in vars(mod).items()
                    if inspect.isfunction(f) and f.__module__ == mod.__name__}


def test_the_driver_exists_once():
    """No file under fast/ defines a function of the driver (reference/model.py, blocks.py), under
    its name or its old private name."""
    assert {"run", "advance", "stack_forward", "block_forward", "complete_chunks"} <= DRIVER_FUNCTIONS
    names = DRIVER_FUNCTIONS | {"_" + n for n in DRIVER_FUNCTIONS}
    public_api = {"forward", "init_state", "loss_and_grads", "cms_increments", "loss_with_increments",
                  "init_params", "param_shapes", "param_counts", "state_size"}  # thin wrappers with ops
    bad = []
    for path in FAST:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name in names - public_api - {"_" + n for n in public_api}:
                if path.name == "model.py" or node.name in {"stack_forward", "_stack_forward", "block_forward",
                                                           "_block_forward", "advance", "_advance"}:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: def {node.name}")
    assert not bad, "a copy of the model driver under fast/:\n" + "\n".join(bad)


def test_the_ports_run_the_drivers_functions_with_their_ops():
    assert cpu_model.CPU.primitives.__name__ == "nlref.fast.cpu.primitives"
    assert cpu_model.CPU.cms.__name__ == "nlref.fast.cpu.cms"
    assert cpu_model.layer("hope").__name__ == "nlref.fast.cpu.selfmod"
    assert driver.REFERENCE.layer("hope").__name__ == "nlref.reference.selfmod"
    pkg = namespace.load("numpy")
    assert pkg.model.ops.np is pkg.xp and pkg.model.ops.primitives is pkg.primitives
    assert pkg.model.forward.func is driver.forward and pkg.model.loss_and_grads.func is driver.loss_and_grads
    assert "model" not in namespace.MODULES  # the driver is not executed over the namespace: it takes ops
    # the CPU port's savings are switches of the one driver; the reference runs without them
    assert cpu_model.CPU.reuse_chunk_forward and cpu_model.CPU.cms_grads_only and cpu_model.CPU.reuse_layer_caches
    assert cpu_model.CPU.reuse_span_layers and cpu_model.CPU.cms_grads_needed and cpu_model.CPU.reuse_min_chunk > 1
    assert cpu_model.CPU.cms_factored_writes and cpu_model.CPU.lowest_layer_once
    assert not (driver.REFERENCE.reuse_chunk_forward or driver.REFERENCE.cms_grads_only
                or driver.REFERENCE.reuse_layer_caches or driver.REFERENCE.reuse_span_layers
                or driver.REFERENCE.cms_grads_needed or driver.REFERENCE.reuse_min_chunk != 1
                or driver.REFERENCE.cms_factored_writes or driver.REFERENCE.lowest_layer_once)


def test_each_saving_alone_computes_the_reference_function():
    """Every switch of Ops, alone, on the reference's own modules: the same loss and gradients (the
    reuse of the chunk forward, the CMS-only backward, the wanted CMS gradients and the factored writes (with the
    wanted gradients they need) are exact; the merged layer caches are bitwise for block 0 and rounding above it,
    float64 here)."""
    import dataclasses

    cfg = dataclasses.replace(preset("hope-tiny"), dtype="float64")
    params = driver.init_params(cfg, 3)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 37))
    loss, grads = driver.loss_and_grads(params, tokens, cfg)
    assert contract.factored_levels(dataclasses.replace(driver.REFERENCE, cms_factored_writes=True,
                                                        cms_grads_needed=True), cfg) == {0}  # period 2: 2 (8 + 8) < 8 x 8
    for switch in ("reuse_chunk_forward", "cms_grads_only", "copy_history", "cms_grads_needed",
                   "cms_grads_needed+cms_factored_writes"):
        ops = dataclasses.replace(driver.REFERENCE, **{s: not getattr(driver.REFERENCE, s) for s in switch.split("+")})
        l2, g2 = driver.loss_and_grads(params, tokens, cfg, ops=ops)
        assert l2 == loss, switch
        for k in grads:
            np.testing.assert_array_equal(g2[k], grads[k], err_msg=f"{switch}: {k}")
    # block 0's layer once over the whole sequence: the same function, its own chunks split otherwise
    ops = dataclasses.replace(driver.REFERENCE, lowest_layer_once=True, cms_grads_only=True)
    assert contract.lowest_layer_once(ops, cfg) and cfg.cms_chunk is not None
    l2, g2 = driver.loss_and_grads(params, tokens, cfg, ops=ops)
    assert_close(l2, loss, "float64", "rewrite", "loss")
    for k in grads:
        assert_close(g2[k], grads[k], "float64", "rewrite", k)


def test_contract_errors_are_the_models():
    cfg = preset("hope-tiny")
    params = driver.init_params(cfg, 0)
    for bad, msg in ((dict(params, extra=np.zeros(1)), "does not use"), ({}, "is missing")):
        for fn in (driver.loss_and_grads, cpu_model.loss_and_grads):
            try:
                fn(bad, np.zeros((1, 4), dtype=np.int64), cfg)
            except ValueError as exc:
                assert msg in str(exc)
            else:
                raise AssertionError(f"{fn.__module__} accepted bad params")
    assert contract.STATE_KEYS == driver.STATE_KEYS


def test_cupy_safety_rule_of_the_modules_the_gpu_port_runs():
    """Each module of namespace.MODULES states the rule at its top and keeps it: numpy is imported
    once, as ``np``, and never named otherwise (rebinding ``np`` moves every function body)."""
    bad = []
    for name in namespace.MODULES:
        path = ROOT / "reference" / f"{name}.py"
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        doc = ast.get_docstring(tree) or ""
        if "CuPy-safe" not in doc:
            bad.append(f"reference/{name}.py: its docstring does not state the CuPy-safety rule ('CuPy-safe')")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "numpy" and a.asname != "np":
                        bad.append(f"reference/{name}.py:{node.lineno}: import numpy as {a.asname}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numpy":
                bad.append(f"reference/{name}.py:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Name) and node.id == "numpy":
                bad.append(f"reference/{name}.py:{node.lineno}: names numpy directly")
    assert not bad, "\n".join(bad)
