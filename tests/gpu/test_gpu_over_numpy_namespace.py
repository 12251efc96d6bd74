"""The GPU port's logic on the CPU (SPEC.md#fast-gpu): fast/gpu over the NumPy namespace.

Runs in CI without a GPU. ``namespace.load("numpy")`` runs the reference's own modules with their
``np`` rebound to NumPy, so everything here must equal the reference BIT FOR BIT: the model API
(loss and every gradient, forward logits and state, chained calls, CMS increments) on the tiny
presets and on drawn configurations of every family, the host-interface op views, the optimizers.
Also: the rebinding itself (a spy namespace sees the function bodies' calls, the reference's modules
stay on NumPy), tree conversion, the registry's gpu column, the one-hot ``add.at``, the errors
without a GPU, and the NL_REQUIRE_GPU / NL_GPU_ERRORS switches of tests/gpu_helpers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from gpu_helpers import assert_bitwise_tree, layer_config, record_error, worst_errors
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import FAMILIES, model_configs
from tolerances import assert_close

from nlref import config
from nlref.fast import registry
from nlref.fast.gpu import model as G
from nlref.fast.gpu import namespace, ops
from nlref.reference import cms as RC
from nlref.reference import model as R
from nlref.reference import optimizers as RO
from nlref.reference import primitives as RP
from nlref.reference import titans as RT


@pytest.fixture(autouse=True)
def numpy_namespace(monkeypatch):
    monkeypatch.setattr(G, "NAMESPACE", "numpy")


def _check_model_bitwise(cfg, params, tokens, split):
    lg, gg = G.loss_and_grads(params, tokens, cfg)
    lr, gr = R.loss_and_grads(params, tokens, cfg)
    assert isinstance(lg, float) and lg == float(lr)
    assert_bitwise_tree(gg, gr, "grads")
    yg, sg = G.forward(params, tokens, cfg)
    yr, sr = R.forward(params, tokens, cfg)
    assert_bitwise_tree(yg, yr, "logits")
    assert_bitwise_tree(sg, sr, "state")
    # chained calls continue a state: each call equals the reference's same call
    y1g, s1g = G.forward(params, tokens[:, :split], cfg)
    y1r, s1r = R.forward(params, tokens[:, :split], cfg)
    assert_bitwise_tree(y1g, y1r, "logits[:split]")
    assert_bitwise_tree(s1g, s1r, "state after split")
    y2g, s2g = G.forward(params, tokens[:, split:], cfg, s1g)
    y2r, s2r = R.forward(params, tokens[:, split:], cfg, s1r)
    assert_bitwise_tree(y2g, y2r, "logits[split:]")
    assert_bitwise_tree(s2g, s2r, "state after both")
    ig, ir = G.cms_increments(params, tokens, cfg), R.cms_increments(params, tokens, cfg)
    assert_bitwise_tree(ig, ir, "cms increments")
    if ir:
        assert G.loss_with_increments(params, tokens, cfg, ir) == float(R.loss_with_increments(params, tokens, cfg, ir))
    assert_bitwise_tree(G.init_state(params, cfg, tokens.shape[0]), R.init_state(params, cfg, tokens.shape[0]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", [f"{f}-tiny" for f in FAMILIES])
def test_tiny_presets_are_bitwise_the_reference(name, dtype):
    cfg = dataclasses.replace(config.preset(name), dtype=dtype)
    params = R.init_params(cfg, 3)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9))
    _check_model_bitwise(cfg, params, tokens, split=4)


def test_step_norm_is_bitwise_the_reference():
    """mem_step_norm (SPEC.md#hope-stability) is reference source the namespace executes too."""
    cfg = dataclasses.replace(config.preset("hope-tiny"), mem_step_norm=True)
    params = R.init_params(cfg, 3)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9))
    _check_model_bitwise(cfg, params, tokens, split=4)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3)
@given(data=st.data())
def test_drawn_configs_are_bitwise_the_reference(family, data):
    cfg = data.draw(model_configs(family))
    seed = data.draw(st.integers(0, 2**20))
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 9))
    split = data.draw(st.integers(1, T - 1))
    note(f"{cfg} B={B} T={T} split={split}")
    params = R.init_params(cfg, seed)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))
    _check_model_bitwise(cfg, params, tokens, split)


def test_op_views_are_bitwise_the_reference(rng):
    # a primitive (gelu runs the module's _erf) and LayerNorm
    x = rng.standard_normal((2, 3, 4))
    up = rng.standard_normal((2, 3, 4))
    for op, args in (("gelu", (x,)), ("layernorm", (x, rng.standard_normal(4), rng.standard_normal(4)))):
        yg, cg = getattr(ops.primitives, op + "_forward")(*args)
        yr, cr = getattr(RP, op + "_forward")(*args)
        assert_bitwise_tree(yg, yr, op)
        assert_bitwise_tree(getattr(ops.primitives, op + "_backward")(up, cg), getattr(RP, op + "_backward")(up, cr), op)
    # Titans: forward, then backward of the (host) cache, continuing a state
    for memory in ("matrix", "mlp"):
        cfg = RT.TitansConfig(d_model=4, n_heads=2, chunk=3, memory=memory, hidden=3, eta_max=0.5)
        params = RT.init_params(cfg, rng)
        x0, x = rng.standard_normal((2, 2, 4)), rng.standard_normal((2, 7, 4))
        s0 = RT.titans_forward(x0, params, cfg)[2]
        yg, cg, sg = ops.titans.titans_forward(x, params, layer_config(cfg), s0)
        yr, cr, sr = RT.titans_forward(x, params, cfg, s0)
        assert_bitwise_tree((yg, sg), (yr, sr), f"titans {memory}")
        dy = rng.standard_normal(yr.shape)
        assert_bitwise_tree(ops.titans.titans_backward(dy, cg), RT.titans_backward(dy, cr), f"titans {memory} backward")
    # CMS chain
    u = rng.standard_normal((2, 5, 3))
    groups = [RC.groups_for(2, 1, 5)]
    weights = [(rng.standard_normal((2, len(groups[0]), 3, 4)), rng.standard_normal((2, len(groups[0]), 4, 3)))]
    yg, cg = ops.cms.forward(u, weights, groups, "sequential", "gelu")
    yr, cr = RC.forward(u, weights, groups, "sequential", "gelu")
    assert_bitwise_tree(yg, yr, "cms")
    dy = rng.standard_normal(u.shape)
    assert_bitwise_tree(ops.cms.backward(dy, cg), RC.backward(dy, cr), "cms backward")
    assert repr(ops.titans) == "<GPU host view of reference.titans>"
    assert ops.titans.titans_forward.__name__ == "titans_forward"


@pytest.mark.parametrize("layer", ["titans", "selfmod"])
def test_op_views_accept_the_reference_layer_configs(layer, rng):
    """The loaded modules' config classes are the reference's own (namespace.py rebinds them)."""
    from nlref.reference import selfmod as RS

    if layer == "titans":
        cfg = RT.TitansConfig(d_model=4, n_heads=2, chunk=2)
        params, fn = RT.init_params(cfg, rng), ops.titans.titans_forward
    else:
        cfg = RS.SelfModConfig(d_model=4, n_heads=2, hidden=3)
        params, fn = RS.init_params(cfg, rng), ops.selfmod.forward
    y, _, _ = fn(rng.standard_normal((1, 3, 4)), params, cfg)
    assert y.shape == (1, 3, 4) and isinstance(y, np.ndarray)


def test_to_device_and_to_host_keep_nested_trees():
    tree = {"a": np.arange(3.0), "b": [np.ones((2, 2)), (np.zeros(1), 5, "s")], "c": None, "d": 2.5}
    dev = G.to_device(tree)
    assert list(dev) == list(tree) and isinstance(dev["b"], list) and isinstance(dev["b"][1], tuple)
    assert dev["b"][1][1:] == (5, "s") and dev["c"] is None and dev["d"] == 2.5
    assert_bitwise_tree(G.to_host(dev), tree)

    class FakeDeviceArray:  # what to_host recognises as a cupy.ndarray: .get(), .device, .shape
        device, shape = "fake", (2,)

        def get(self):
            return np.array([1.0, 2.0])

    host = G.to_host({"x": [FakeDeviceArray(), np.zeros(1)], "y": (FakeDeviceArray(),)})
    np.testing.assert_array_equal(host["x"][0], [1.0, 2.0])
    assert isinstance(host["y"], tuple) and isinstance(host["y"][0], np.ndarray)
    assert G.xp() is np
    G.synchronize()  # a no-op on NumPy


def test_registry_gpu_column_covers_every_op():
    assert registry.ported("gpu") == list(registry.REGISTRY)
    for op in registry.REGISTRY:
        fn = registry.load(op, "gpu")
        assert callable(fn), op
        assert fn.__name__ == op.split(".")[-1], op  # the reference's function, wrapped


def test_cupy_without_a_device_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(namespace, "cupy_available", lambda: (False, "no device in this test"))
    monkeypatch.setattr(namespace, "_LOADED", {})
    with pytest.raises(RuntimeError, match="no device in this test"):
        namespace.load("cupy")
    assert not namespace._LOADED
    with pytest.raises(ValueError, match="'numpy' or 'cupy'"):
        namespace.load("jax")
    ok, why = namespace.cupy_available()  # the real probe: a bool and a reason or device name
    assert isinstance(ok, bool) and why


@pytest.mark.parametrize("seed", range(6))
def test_add_at_one_hot_equals_numpy_add_at(seed):
    rng = np.random.default_rng(seed)
    V, D, N = int(rng.integers(1, 8)), int(rng.integers(1, 5)), int(rng.integers(1, 20))
    for dtype in ("float64", "float32"):
        idx = rng.integers(0, V, size=N)  # repeated indices (N up to 20 over V <= 7)
        idx[: min(N, 2)] = idx[0]
        vals = rng.standard_normal((N, D)).astype(dtype)
        a0 = rng.standard_normal((V, D)).astype(dtype)
        got, want = a0.copy(), a0.copy()
        assert namespace._AddWithAt(np.add, np).at(got, idx, vals) is None
        np.add.at(want, idx, vals)
        assert got.dtype == want.dtype
        assert_close(got, want, dtype, "rewrite", f"add.at (V={V}, D={D}, N={N})")
    # other patterns go to the namespace's own add.at, and the call is add itself
    v1 = rng.standard_normal(5)
    got, want = np.zeros(3), np.zeros(3)
    namespace._AddWithAt(np.add, np).at(got, np.array([0, 2, 2, 1, 0]), v1)
    np.add.at(want, np.array([0, 2, 2, 1, 0]), v1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(namespace._AddWithAt(np.add, np)(v1, 1.0), v1 + 1.0)


def test_loaded_modules_compute_on_the_namespace_and_leave_the_reference_alone(monkeypatch):
    pkg = namespace.load("numpy")
    import nlref.reference as ref

    for name in namespace.MODULES:
        mod = getattr(pkg, name)
        assert mod is not getattr(ref, name, None) and mod.__name__ == f"{pkg.__name__}.{name}"
        assert mod.np is pkg.xp is np
    ops = pkg.model.ops  # the one model driver runs with the loaded siblings, not the reference's modules
    assert ops.primitives is pkg.primitives and ops.cms is pkg.cms and ops.np is pkg.xp
    assert ops.layer("hope") is pkg.selfmod and ops.layer("titans") is pkg.titans
    assert pkg.config is config or pkg.config.__name__ == "nlref.reference.config"

    # A spy namespace (NumPy underneath, counting every attribute the function bodies take):
    # the loaded code goes through it, gives the reference's numbers, and reference/ keeps NumPy.
    calls: dict[str, int] = {}

    class Spy(types.ModuleType):
        def __getattr__(self, name):
            calls[name] = calls.get(name, 0) + 1
            return getattr(np, name)

    monkeypatch.setattr(namespace, "_LOADED", {})
    monkeypatch.setattr(namespace, "_namespace", lambda *args, **kwargs: Spy("spy"))
    try:
        spy = namespace.load("spy")
        for name in namespace.MODULES:
            assert isinstance(getattr(spy, name).np, Spy), name
            assert getattr(ref, name).np is np, f"reference.{name}.np was rebound"
        cfg = config.preset("hope-tiny")
        params = R.init_params(cfg, 0)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 6))
        calls.clear()
        loss, grads = spy.model.loss_and_grads(params, tokens, cfg)
        assert sum(calls.values()) > 50 and ("einsum" in calls or "matmul" in calls), calls
        lr, gr = R.loss_and_grads(params, tokens, cfg)
        assert loss == lr
        assert_bitwise_tree(grads, gr)
    finally:
        for key in [k for k in sys.modules if k.startswith("nlref.fast.gpu._xp_spy")]:
            del sys.modules[key]
    assert RP.np is np and R.np is np


def test_optimizers_over_numpy_are_the_reference_adamw(rng):
    cfg = config.preset("transformer-tiny")
    params = R.init_params(cfg, 0)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 8))
    opt_g, opt_r = G.optimizers().make("adamw", lr=1e-2), RO.make("adamw", lr=1e-2)
    assert G.optimizers() is namespace.load("numpy").optimizers
    pg, sg = params, opt_g.init(params)
    pr, sr = params, opt_r.init(params)
    for _ in range(3):
        _, gg = G.loss_and_grads(pg, tokens, cfg, as_numpy=False)
        _, gr = R.loss_and_grads(pr, tokens, cfg)
        pg, sg = opt_g.update(pg, gg, sg)
        pr, sr = opt_r.update(pr, gr, sr)
    assert_bitwise_tree(pg, pr, "params")
    assert_bitwise_tree(sg, sr, "optimizer state")


_REQUIRE = """
from nlref.fast.gpu import namespace
namespace.cupy_available = lambda: (False, "forced by the test")
from gpu_helpers import require_gpu
require_gpu()

def test_never_runs():
    pass
"""


@pytest.mark.parametrize("require", ["1", "0"])
def test_require_gpu_skips_or_fails_the_collection(tmp_path, require):
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(_REQUIRE))
    tests = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("NL_GPU_TESTS_ON_NUMPY", "NL_REQUIRE_GPU")}
    env.update(NL_REQUIRE_GPU=require, PYTHONPATH=os.pathsep.join([tests, env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_probe.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    text = out.stdout + out.stderr
    if require == "1":  # a collection error: pytest's exit code 2 (interrupted)
        assert out.returncode == 2, text
        assert "NL_REQUIRE_GPU=1 but the GPU tests cannot run: forced by the test" in text, text
        assert "1 error" in text, text
    else:  # 5: pytest's "no tests collected" when the only module was skipped
        assert out.returncode in (0, 5), text
        assert "1 skipped" in text and "forced by the test" in text, text


def test_error_records_are_json_lines_and_reduce_to_the_worst(tmp_path, monkeypatch):
    path = tmp_path / "errors.jsonl"
    monkeypatch.delenv("NL_GPU_ERRORS", raising=False)
    record_error("x", "float32", 1e-6)
    assert not path.exists()
    monkeypatch.setenv("NL_GPU_ERRORS", str(path))
    record_error("x", "float32", 1e-6)
    record_error("y", np.float32, 3e-6, tolerance=5e-4)
    record_error("z", "float64", 2e-14)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and rows[1]["tensor"] == "y" and rows[1]["tol"] == 5e-4
    assert rows[0]["test"].endswith("test_error_records_are_json_lines_and_reduce_to_the_worst")
    worst = worst_errors(path)
    assert {k[1]: v["tensor"] for k, v in worst.items()} == {"float32": "y", "float64": "z"}


def test_the_gpu_tests_themselves_pass_over_numpy():
    """tests/gpu/test_gpu_device_*.py only run on a GPU; here, in every CI run, they run over the NumPy
    namespace (NL_GPU_TESTS_ON_NUMPY=1: every same-call comparison must be exact), so the GPU
    tests cannot rot between the sessions that have a GPU. Says nothing about a GPU itself."""
    tests = Path(__file__).resolve().parents[1]
    files = sorted(str(p) for p in (tests / "gpu").glob("test_gpu_device_*.py"))
    assert len(files) >= 4, files
    env = {k: v for k, v in os.environ.items() if k not in ("NL_REQUIRE_GPU", "NL_GPU_ERRORS")}
    env.update(NL_GPU_TESTS_ON_NUMPY="1", PYTHONPATH=os.pathsep.join([str(tests), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                         cwd=tests.parent, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    text = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, text
    assert " passed" in text and "skipped" not in text and "failed" not in text, text
