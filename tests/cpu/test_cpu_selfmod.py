"""fast.cpu.selfmod vs reference.selfmod: outputs, returned state and every gradient (SPEC.md#selfmod).

One hypothesis draw makes a layer config (MLP/matrix memories, LayerNorm, momentum on/off, adaptive q,
single shrink, the two chunk sizes, lengths that do not divide them, stop_grad_writes), a dtype, a
seed and whether the call continues a stream from inside a chunk; inputs are read-only and checked
unchanged; the upstream gradient reaches both y and the returned state. Tolerances:
("float64"|"float32", "port") and ("float32", "port_vs_own_rounding").

LayerNorm on the memories' branch is drawn in float64 only: in float32 a second evaluation of the
layer differs from the reference by up to 2e-2 relative in cancelling gradients (the reference is
itself up to 1e-2 from its float64 value there; measured with /tmp/p2_meas_s2.py), so a float32
comparison would test rounding, not the port.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from cases_fast import selfmod_make as _make
from hypothesis import given
from hypothesis import strategies as st
from port_helpers import assert_state_layout_is_irrelevant, note
from port_helpers import copy_tree as _copy
from port_helpers import readonly as _ro
from strategies import selfmod_layer_configs as configs
from tolerances import assert_close, tol

from nlref.fast.cpu import selfmod as FS
from nlref.reference import selfmod as RS
from nlref.reference.cases.selfmod import example_params
from nlref.reference.gradcheck import check_gradients


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), 1e-12)


def _assert_same_tree(fast, ref, dtype, name, ref64=None, kind="port"):
    """Same structure, dtypes and values. With ``ref64`` (float32 draws: the reference in float64) a
    tensor may differ from the float32 reference by ("float32", "port_vs_own_rounding") times the
    reference's own float32 rounding error where that exceeds the fixed row (tests/tolerances.py)."""
    if isinstance(ref, dict):
        assert list(fast) == list(ref), f"{name}: keys {list(fast)} != {list(ref)}"
        for k in ref:
            _assert_same_tree(fast[k], ref[k], dtype, f"{name}[{k}]", None if ref64 is None else ref64[k], kind)
        return
    if not isinstance(ref, np.ndarray):
        assert fast == ref, f"{name}: {fast!r} != {ref!r}"
        return
    assert isinstance(fast, np.ndarray) and fast.dtype == ref.dtype, f"{name}: dtype {getattr(fast, 'dtype', None)}"
    err = _rel(fast, ref)
    note(f"{name}: rel diff {err:.3e}")
    if ref64 is None:
        assert_close(fast, ref, dtype, kind, name)
        return
    own = _rel(ref, ref64)
    bound = max(tol(dtype, "port"), tol(dtype, "port_vs_own_rounding") * own)
    assert fast.shape == ref.shape, f"{name}: shape {fast.shape} != {ref.shape}"
    assert err <= bound, f"{name}: rel {err:.3e} > {bound:.3e} (the float32 reference is {own:.3e} from float64)"


@given(configs)
def test_fast_selfmod_matches_reference(c):
    note(str(c))
    cfg, rng, x, params, state = _make(c)
    x, params = _ro(x), _ro(params)
    state = _ro(state) if state is not None else None
    saved = (x.copy(), _copy(params), _copy(state) if state is not None else None)
    yf, cf, sf = FS.forward(x, params, cfg, state)
    yr, cr, sr = RS.forward(x, params, cfg, state)
    assert "reference" not in cf, "the equivalence test must not take the reference fallback"
    kind = "port_selfmod_layernorm" if cfg.layernorm else "port"  # LN: float64 draws only
    _assert_same_tree(yf, yr, c["dtype"], "y", kind=kind)
    _assert_same_tree(sf, sr, c["dtype"], "state", kind=kind)
    dy = rng.standard_normal(yr.shape).astype(c["dtype"])
    dstate = _ro({k: rng.standard_normal(v.shape).astype(c["dtype"]) for k, v in sr.items()
                  if isinstance(v, np.ndarray)})  # fmt: skip
    if c["dstate"] == "none":
        dstate = None
    elif c["dstate"] == "partial":  # the first memory keeps its cotangents; the others: zeros or missing
        first = cfg.memories[0]
        dstate = {k: (v if k.split(".")[0] in (first, "conv_q", "conv_k", "conv_v") else
                      (np.zeros_like(v) if i % 2 else None)) for i, (k, v) in enumerate(dstate.items())}
        dstate = {k: v for k, v in dstate.items() if v is not None}
    gf = FS.backward(dy, cf, dstate)
    gr = RS.backward(dy, cr, dstate)
    g64 = [None] * 3
    if c["dtype"] == "float32":  # the reference's own float32 rounding, for cancelling gradients
        _, _, x6, p6, s6 = _make({**c, "dtype": "float64"})
        c6 = RS.forward(x6, p6, cfg, s6)[1]
        g64 = RS.backward(dy.astype(np.float64), c6,
                          None if dstate is None else {k: v.astype(np.float64) for k, v in dstate.items()})
    for name, a, b, b64 in zip(("dx", "dparams", "dstate0"), gf, gr, g64, strict=True):
        _assert_same_tree(a, b, c["dtype"], name, b64, kind)
    np.testing.assert_array_equal(x, saved[0])
    for k, v in params.items():
        np.testing.assert_array_equal(v, saved[1][k])
    if state is not None:
        for k, v in state.items():
            np.testing.assert_array_equal(v, saved[2][k])


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.booleans(),
       st.sampled_from(["float32", "float64"]), st.integers(0, 999))  # fmt: skip
def test_key_write_kernel_matches_the_reference_token_writes(n, a, b, momentum, dtype, seed):
    """The compiled key-side writes == reference.selfmod.write applied token by token, and their VJP
    == reference.selfmod.write_chunk_backward on the dense per-token gradients."""
    rng = np.random.default_rng(seed)
    B, H = 2, 2
    P0, S0 = (rng.standard_normal((B, H, a, b)).astype(dtype) for _ in range(2))
    L, K = rng.standard_normal((B, H, n, a)).astype(dtype), rng.standard_normal((B, H, n, b)).astype(dtype)
    ep, alpha = rng.uniform(0, 0.5, (B, H, n)).astype(dtype), rng.uniform(0.5, 1, (B, H, n)).astype(dtype)
    beta = rng.uniform(0.2, 0.9, H).astype(dtype) if momentum else None
    S0 = S0 if momentum else np.zeros_like(S0)
    Pf, Sf = FS.key_write(P0, S0, L, K, ep, alpha, beta)
    G = L[..., :, None] * K[..., None, :]  # (B, H, n, a, b)
    Pr, Sr = P0, S0
    for j in range(n):
        Pr, Sr, _ = RS.write(Pr, Sr, G[:, :, j], K[:, :, j], ep[:, :, j], alpha[:, :, j], beta, True)
    _assert_same_tree(Pf, Pr, dtype, "P")
    if momentum:
        _assert_same_tree(Sf, Sr, dtype, "S")
    dP, dS = rng.standard_normal(P0.shape).astype(dtype), rng.standard_normal(P0.shape).astype(dtype)
    dS = dS if momentum else np.zeros_like(dS)
    dP0, dS0, dL, dK, dep, dal, dbeta = FS.key_write_backward(dP, dS, P0, S0, L, K, ep, alpha, beta)
    c_write = RS.write_chunk(P0, S0, G, K, ep, alpha, beta, True)[2]
    rP0, rS0, rG, rk, rep, ral, rbeta = RS.write_chunk_backward(dP, dS, c_write)
    _assert_same_tree(dP0, rP0, dtype, "dP0")
    _assert_same_tree(dL, np.einsum("zhnac,zhnc->zhna", rG, K), dtype, "dL")
    _assert_same_tree(dK, rk + np.einsum("zhnac,zhna->zhnc", rG, L), dtype, "dK")
    _assert_same_tree(dep, rep, dtype, "dep")
    _assert_same_tree(dal, ral, dtype, "dalpha")
    if momentum:
        _assert_same_tree(dS0, rS0, dtype, "dS0")
        _assert_same_tree(dbeta.sum(axis=0), rbeta, dtype, "dbeta")


@pytest.mark.parametrize("kw", [dict(chunk_memory=2, chunk_other=3), dict(memory="matrix", chunk_memory=2, chunk_other=1),
                                dict(chunk_memory=3, chunk_other=2, momentum=False, adaptive_q=True)])  # fmt: skip
def test_fast_backward_passes_the_gradient_check(kw):
    """The port's own backward against central differences and the dot-product test (float64), on
    the keys the reference's GRADCHECKS resolve (>= 1e-2 of the largest gradient)."""
    rng = np.random.default_rng(5)
    cfg = RS.SelfModConfig(d_model=2, n_heads=1, hidden=2, eta_max=1.0, **kw)
    params = example_params(cfg, rng)
    x = rng.standard_normal((1, 5, 2))
    u = rng.standard_normal(x.shape)
    _, cache, _ = FS.forward(x, params, cfg)
    dx, dparams, _ = FS.backward(u, cache)
    grads = {"x": dx, **dparams}
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    grads = {k: g for k, g in grads.items() if float(np.max(np.abs(g))) >= 1e-2 * scale}

    def loss(d):
        d = dict(d)
        xx = d.pop("x")
        return np.sum(FS.forward(xx, d, cfg)[0] * u)

    errors = check_gradients(loss, {"x": x, **params}, grads, rng)
    assert max(errors.values()) < tol("float64", "gradcheck"), errors


def test_a_wrong_port_would_be_caught():
    """A key-side write without the DGD shrink gives a different layer, and the comparison sees it."""
    c = dict(B=1, T=6, T0=1, H=1, dh=3, Hm=3, memory="mlp", cm=3, co=2, layernorm=False, momentum=True,
             adaptive_q=False, single_shrink=False, sg=False, stream=False, dtype="float64", seed=2)  # fmt: skip
    cfg, rng, x, params, _ = _make(c)
    yr = RS.forward(x, params, cfg)[0]
    real = FS.key_write

    def no_shrink(P0, S0, L, K, ep, alpha, beta):
        return real(P0, S0, L, np.zeros_like(K), ep, alpha, beta)

    FS.key_write = no_shrink
    try:
        yf = FS.forward(x, params, cfg)[0]
    finally:
        FS.key_write = real
    with pytest.raises(AssertionError):
        _assert_same_tree(yf, yr, "float64", "y")


def test_fallbacks_are_explicit():
    """forward_loop and complex inputs (the complex-step path) run the reference, bit for bit."""
    cfg = RS.SelfModConfig(d_model=2, n_heads=1, hidden=2, chunk_memory=2, chunk_other=2)
    rng = np.random.default_rng(0)
    params = example_params(cfg, rng)
    x = rng.standard_normal((1, 3, 2))
    yf, cf, _ = FS.forward_loop(x, params, cfg)
    yr, cr, _ = RS.forward_loop(x, params, cfg)
    assert "reference" in cf
    np.testing.assert_array_equal(yf, yr)
    np.testing.assert_array_equal(FS.backward(np.ones_like(yf), cf)[0], RS.backward(np.ones_like(yr), cr)[0])
    pc = {k: v.astype(complex) for k, v in params.items()}
    yf, cf, _ = FS.forward(x.astype(complex), pc, cfg)
    assert "reference" in cf
    np.testing.assert_array_equal(yf, RS.forward(x.astype(complex), pc, cfg)[0])


def test_backward_accepts_a_reference_cache():
    """A cache made by reference.selfmod.forward is differentiated by the reference (explicit
    fallback: the port's own cache keeps rank-1 factors per segment, a different layout)."""
    cfg = RS.SelfModConfig(d_model=4, n_heads=2, hidden=3, chunk_memory=2, chunk_other=3)
    rng = np.random.default_rng(1)
    params = example_params(cfg, rng)
    x = rng.standard_normal((1, 5, 4))
    y, cr, _ = RS.forward(x, params, cfg)
    u = rng.standard_normal(y.shape)
    gf, gr = FS.backward(u, cr), RS.backward(u, cr)
    np.testing.assert_array_equal(gf[0], gr[0])
    for k in gr[1]:
        np.testing.assert_array_equal(gf[1][k], gr[1][k])


@pytest.mark.parametrize("change", ["drop:k.W1", "drop:pos_memory", "drop:conv_v", "shape:v.S_W2", "dtype:memory.W1_b",
                                    "shape:conv_q", "list:alpha.W2"])  # fmt: skip
def test_bad_state_gives_the_reference_error(change):
    """The port checks the state without building one; the messages are the reference's."""
    cfg = RS.SelfModConfig(d_model=4, n_heads=2, hidden=3)
    params = RS.init_params(cfg, np.random.default_rng(0))
    state = RS.init_state(params, cfg, 2)
    what, key = change.split(":")
    if what == "drop":
        del state[key]
    elif what == "shape":
        state[key] = np.zeros(state[key].shape[:-1] + (7,))
    elif what == "dtype":
        state[key] = state[key].astype(np.float32)
    else:
        state[key] = state[key].tolist()
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError) as want:
        RS.forward(x, params, cfg, state)
    with pytest.raises(ValueError) as got:
        FS.forward(x, params, cfg, state)
    assert str(got.value) == str(want.value)


def test_bad_input_raises_like_the_reference():
    cfg = RS.SelfModConfig(d_model=4, n_heads=2, hidden=3)
    params = RS.init_params(cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"x: expected an array of shape \(B, T, D\)"):
        FS.forward(np.zeros((1, 3, 5)), params, cfg)
    with pytest.raises(ValueError, match="params\\['W_q'\\]"):
        FS.forward(np.zeros((1, 3, 4)), {**params, "W_q": np.zeros((4, 3))}, cfg)
    with pytest.raises(ValueError, match="dtype"):
        FS.forward(np.zeros((1, 3, 4), dtype=np.float32), params, cfg)
    with pytest.raises(ValueError, match="state\\['k.W1'\\]"):
        st_ = RS.init_state(params, cfg, 1)
        FS.forward(np.zeros((1, 3, 4)), params, cfg, {**st_, "k.W1": np.zeros((1, 2, 2, 2))})
    y, cache, _ = FS.forward(np.zeros((1, 3, 4)), params, cfg)
    with pytest.raises(ValueError, match="dy"):
        FS.backward(np.zeros((1, 2, 4)), cache)


_NOJIT_SCRIPT = """
import numpy as np
from nlref.fast.cpu import selfmod as FS
from nlref.reference.gradcheck import check_gradients
from nlref.reference import selfmod as RS
from nlref.reference.cases.selfmod import example_params
import numba
assert numba.config.DISABLE_JIT
rng = np.random.default_rng(0)
for kw in ({"memory": "mlp"}, {"memory": "matrix", "momentum": False}, {"memory": "mlp", "layernorm": True}):
    cfg = RS.SelfModConfig(d_model=6, n_heads=2, hidden=3, chunk_memory=2, chunk_other=3, eta_max=0.5, **kw)
    p = example_params(cfg, rng)
    x = rng.standard_normal((1, 5, 6))
    yf, cf, _ = FS.forward(x, p, cfg)
    yr, cr, _ = RS.forward(x, p, cfg)
    u = rng.standard_normal(yr.shape)
    gf, gr = FS.backward(u, cf)[1], RS.backward(u, cr)[1]
    errs = [np.max(np.abs(yf - yr))] + [np.max(np.abs(gf[k] - gr[k])) / max(1.0, np.max(np.abs(gr[k]))) for k in gr]
    assert max(errs) < 1e-10, (kw, max(errs))
print("ok")
"""


def test_kernels_without_jit_match_the_reference():
    """NUMBA_DISABLE_JIT=1: the kernels' Python logic (coverage mode) still matches the reference."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", _NOJIT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_returned_states_never_alias_the_inputs():
    """The port returns its own arrays without copying them (SPEC.md#fast-cpu) but copies those it
    would share with the input state or dstate: a call inside one chunk (the chunk-start states are
    the input's) and zero cotangents (the write backward is skipped) return copies."""
    cfg = RS.SelfModConfig(d_model=4, n_heads=2, hidden=3, chunk_memory=8, chunk_other=8)
    rng = np.random.default_rng(3)
    params = example_params(cfg, rng)
    state = FS.forward(rng.standard_normal((1, 2, 4)), params, cfg)[2]
    y, cache, new = FS.forward(rng.standard_normal((1, 3, 4)), params, cfg, state)  # no chunk starts
    dstate = {k: (np.zeros_like(v) if k.startswith("k.") else rng.standard_normal(v.shape))
              for k, v in new.items() if isinstance(v, np.ndarray)}  # fmt: skip
    dstate0 = FS.backward(rng.standard_normal(y.shape), cache, dstate)[2]
    for out, inp in ((new, state), (dstate0, dstate)):
        for k, v in out.items():
            for u in inp.values():
                if isinstance(v, np.ndarray) and isinstance(u, np.ndarray):
                    assert not np.shares_memory(v, u), k


def test_port_uses_only_public_names_of_the_reference():
    """fast/cpu/selfmod.py takes from reference/selfmod.py only its public contract (weights, keyside,
    init_key, betas, segments, heads, merge, gates, check_inputs, ...), never an underscore name."""
    import pathlib
    import re

    src = pathlib.Path(FS.__file__).read_text(encoding="utf-8")
    assert not re.findall(r"\bRS\._\w+", src)
    used = set(re.findall(r"\bRS\.(\w+)", src))
    assert used and all(hasattr(RS, name) for name in used), sorted(used - set(dir(RS)))


@pytest.mark.parametrize("d_model, n_heads", [(8, 2), (16, 2)])  # head width 4: the token sweep; 8: the UT form
def test_states_are_c_ordered_and_their_layout_does_not_change_the_function(d_model, n_heads):
    """SPEC.md#fast-cpu "State layout": ``init_state``'s arrays are C-ordered at B > 1 (with the batch
    innermost, every product on the state copies its operand first and every compiled pass strides
    through it); a state laid out batch-innermost gives the same outputs and gradients, and the
    port's returned states and state gradients are C-ordered whatever the input's layout."""
    cfg = RS.SelfModConfig(d_model=d_model, n_heads=n_heads, hidden=5, chunk_memory=4, chunk_other=4)
    rng = np.random.default_rng(5)
    params = example_params(cfg, rng)
    B = 3
    fresh = FS.init_state(params, cfg, B)
    for k, v in fresh.items():
        if isinstance(v, np.ndarray) and v.ndim >= 2:
            assert v.flags.c_contiguous, k
    state = FS.forward(rng.standard_normal((B, 3, d_model)), params, cfg)[2]  # mid-chunk
    assert_state_layout_is_irrelevant(FS.forward, FS.backward, params, cfg, state, rng.standard_normal((B, 9, cfg.d_model)),
                                      rng.standard_normal((B, 9, cfg.d_model)), rng, c_ordered=("state", "dstate0"))
