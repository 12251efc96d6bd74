"""Input builders of the port tests (not a test file): from a drawn configuration (tests/strategies.py)
to the arrays, parameters and layer configs both ports are called on.

Shared by the CPU port's tests (tests/cpu/test_cpu_*.py) and the GPU port's (tests/gpu/test_gpu_device_*.py),
so both call the same cases; also by scripts/calibrate_tolerances.py, which measures the errors the
("float32" | "float64", "port") rows of tests/tolerances.py bound on these same cases.
"""

from __future__ import annotations

import numpy as np

from nlref.reference import selfmod as RS
from nlref.reference import titans as RT
from nlref.reference.cases.selfmod import example_params

# ------------------------------------------------------------------------------------------------
# Primitives (tests/cpu/test_cpu_primitives.py, tests/gpu/test_gpu_device_ops.py)
# ------------------------------------------------------------------------------------------------

PRIM_OPS = ("linear", "embedding", "rmsnorm", "l2norm", "silu", "gelu", "sigmoid", "swiglu", "conv1d", "rope",
            "attention", "cross_entropy")
"""The primitives the CPU port compiles (every one has a case in ``prim_case``)."""


def ro(a):
    """A read-only copy of one array."""
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def normal(rng, shape, dtype, scale=1.0):
    """Read-only ``scale`` x standard normal of ``shape`` in ``dtype``."""
    return ro((scale * rng.standard_normal(shape)).astype(dtype))


def as_tuple(g):
    return g if isinstance(g, tuple) else (g,)


def prim_case(op, rng, dtype, n, t, d):
    """(forward args, forward kwargs) of one op of ``PRIM_OPS``; every array read-only."""
    x3 = normal(rng, (n, t, d), dtype)
    if op == "linear":
        return (x3, normal(rng, (d + 1, d), dtype), normal(rng, (d + 1,), dtype)), {}
    if op == "embedding":
        return (ro(rng.integers(0, 7, size=(n, t))), normal(rng, (7, d), dtype)), {}
    if op == "rmsnorm":
        return (x3, normal(rng, (d,), dtype)), {"eps": 1e-6}
    if op == "l2norm":
        return (x3,), {}
    if op in ("silu", "gelu", "sigmoid"):
        return (normal(rng, (n, t, d), dtype, 3.0),), {}
    if op == "swiglu":
        f = d + 2
        return (x3, normal(rng, (f, d), dtype), normal(rng, (f, d), dtype), normal(rng, (d, f), dtype)), {}
    if op == "conv1d":
        return (x3, normal(rng, (d, 4), dtype), normal(rng, (d,), dtype), normal(rng, (n, 3, d), dtype)), {}
    if op == "rope":
        return (normal(rng, (n, 2, t, 2 * d), dtype), ro(np.arange(5, 5 + t))), {}
    if op == "attention":
        tk = t + int(rng.integers(0, 3))
        return (normal(rng, (n, 2, t, d), dtype), normal(rng, (n, 2, tk, d), dtype),
                normal(rng, (n, 2, tk, d + 1), dtype)), {"causal": bool(rng.integers(0, 2)) or tk == t}
    if op == "cross_entropy":
        return (normal(rng, (n, t, 9), dtype, 2.0), ro(rng.integers(0, 9, size=(n, t)))), {}
    raise AssertionError(op)


def prim_run(module, op, args, kwargs, rng_up, dtype):
    """(outputs, gradients) of ``module``'s op forward and backward, the upstream gradient drawn
    from seed ``rng_up`` (conv1d: also a cotangent of its new state)."""
    out = getattr(module, op + "_forward")(*args, **kwargs)
    y, cache = out[0], out[1]
    if op == "cross_entropy":
        grads = module.cross_entropy_backward(np.asarray(1.7, dtype=dtype), cache)
        return (y,), as_tuple(grads)
    up = np.random.default_rng(rng_up).standard_normal(np.shape(y)).astype(dtype)
    if op == "conv1d":
        ups = np.random.default_rng(rng_up + 1).standard_normal(out[2].shape).astype(dtype)
        return (y, out[2]), module.conv1d_backward(up, cache, dnew_state=ups)
    return (y,), as_tuple(getattr(module, op + "_backward")(up, cache))


# ------------------------------------------------------------------------------------------------
# The MLP memory (strategies.mlp_memory_configs)
# ------------------------------------------------------------------------------------------------


def mlp_inputs(c):
    """(rng, W1, W2, k, v) of one drawn MLP-memory config (writable; the tests make them read-only)."""
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]
    lead, N, D, Hm = c["lead"], c["N"], c["D"], c["Hm"]
    W1 = (0.6 * rng.standard_normal((*lead, D, Hm))).astype(dt)
    W2 = (0.6 * rng.standard_normal((*lead, Hm, D))).astype(dt)
    k = rng.standard_normal((*lead, N, D)).astype(dt)
    v = rng.standard_normal((*lead, N, D)).astype(dt)
    return rng, W1, W2, k, v


# ------------------------------------------------------------------------------------------------
# Titans and self-modifying Titans layers (strategies.titans_layer_configs / selfmod_layer_configs)
# ------------------------------------------------------------------------------------------------


def titans_make(c):
    """(cfg, rng, x, params, state) of one drawn Titans config: parameters off their special
    initial values (gate biases where the gates are sensitive); ``state`` continues a stream of
    T0 tokens when c["stream"], else None."""
    kw = dict(d_model=c["H"] * c["dh"], n_heads=c["H"], chunk=c["chunk"], memory=c["memory"], hidden=c["Hm"],
              momentum=c["momentum"], retention=c["retention"], eta_max=0.5,
              layernorm=c["layernorm"] and c["memory"] == "mlp", stop_grad_writes=c["sg"])  # fmt: skip
    cfg = RT.TitansConfig(**kw)
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]
    params = RT.init_params(cfg, rng, np.float64)
    for key in params:  # off the special initial values, gates where they are sensitive
        params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
        if key.startswith("b_"):
            params[key] = 0.5 * rng.standard_normal(params[key].shape) + (1.5 if key == "b_alpha" else 0.0)
    params = {k: v.astype(dt) for k, v in params.items()}
    x = rng.standard_normal((c["B"], c["T"], cfg.d_model)).astype(dt)
    state = None
    if c["stream"]:
        state = RT.titans_forward(rng.standard_normal((c["B"], c["T0"], cfg.d_model)).astype(dt), params, cfg)[2]
    return cfg, rng, x, params, state


def selfmod_make(c):
    """(cfg, rng, x, params, state) of one drawn self-modifying config. LayerNorm only on MLP
    memories with dh >= 3 in float64 (in float32 a second evaluation differs from the reference by
    up to 2e-2 in cancelling gradients: a comparison would test rounding, not the port)."""
    mlp = c["memory"] == "mlp"
    ln = c["layernorm"] and mlp and c["dh"] >= 3 and c["dtype"] == "float64"
    cfg = RS.SelfModConfig(
        d_model=c["H"] * c["dh"], n_heads=c["H"], memory=c["memory"], hidden=c["Hm"],
        layernorm=ln, step_norm=c.get("step_norm", False) and not ln, chunk_memory=c["cm"], chunk_other=c["co"],
        momentum=c["momentum"], adaptive_q=c["adaptive_q"], single_shrink=c["single_shrink"] and not mlp,
        eta_max=0.5, stop_grad_writes=c["sg"], dgd=c.get("dgd", True), retention=c.get("retention", True),
        adaptive_k=c.get("adaptive_k", True), adaptive_v=c.get("adaptive_v", True),
    )  # fmt: skip
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]
    params = example_params(cfg, rng, np.float64)
    params = {k: v.astype(dt) for k, v in params.items()}
    x = rng.standard_normal((c["B"], c["T"], cfg.d_model)).astype(dt)
    state = None
    if c["stream"]:
        state = RS.forward(rng.standard_normal((c["B"], c["T0"], cfg.d_model)).astype(dt), params, cfg)[2]
    return cfg, rng, x, params, state


# ------------------------------------------------------------------------------------------------
# The self-modifying layer's scans (tests/gpu/test_gpu_over_numpy_scans.py, tests/gpu/test_gpu_device_scans.py)
# ------------------------------------------------------------------------------------------------


def scan_case(seed: int, B: int, H: int, n: int, d: int, dtype, transposed: bool):
    """Random key-side A = alpha I - ep k k^T and adjoints; ``transposed`` hands dR in as a
    non-contiguous view (as the planned einsum may return it)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, H, n, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    alpha = rng.uniform(0.5, 1.0, (B, H, n))
    ep = rng.uniform(0.0, 0.5, (B, H, n))
    A = (alpha[..., None, None] * np.eye(d) - ep[..., None, None] * np.einsum("bhnk,bhnl->bhnkl", k, k)).astype(dtype)
    dR = rng.standard_normal((B, H, n, d, d)).astype(dtype)
    if transposed:
        dR = np.ascontiguousarray(np.swapaxes(dR, -1, -2)).swapaxes(-1, -2)
    dfull = rng.standard_normal((B, H, d, d)).astype(dtype)
    return A, dR, dfull, alpha.astype(dtype), rng.standard_normal((B, H, n)).astype(dtype), \
        rng.standard_normal((B, H)).astype(dtype)
