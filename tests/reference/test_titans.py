"""Tests of the Titans memory layer (reference/titans.py; SPEC.md#titans, SPEC.md#chunks).

Gradient checks in float64 (central differences entry by entry and the dot-product test), the
chunk-parallel form against the token-loop oracle (forward, final state, every gradient),
streaming (one call == chained calls at any split, forward and backward), the degenerate settings
(the delta rule and its gated form of reference/memory.py), ``stop_grad_writes``, stability over
4096 float32 tokens, bad input, no mutation. Dims are tiny: D = 4, H <= 2, Hm = 3, T <= 9, B = 2.
"""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.reference import memory as mem_rules
from nlref.reference import titans as Ti
from nlref.reference.cases import titans as Ti_cases
from nlref.reference.gradcheck import check_gradients, dot_product_test

GRAD_TOL = tol("float64", "gradcheck")


def _setup(cfg, B=2, T=7, seed=0, dtype=np.float64, pos=None, gate_bias=0.5):
    """Parameters off their special initial values, an input, and (if pos is given) a mid-chunk
    incoming state with random memory, momentum and convolution history."""
    rng = np.random.default_rng(seed)
    params = Ti.init_params(cfg, rng, dtype)
    for k in params:
        params[k] = (params[k] + 0.3 * rng.standard_normal(params[k].shape)).astype(dtype)
        if k.startswith("b_"):
            params[k] = (gate_bias * rng.standard_normal(params[k].shape)).astype(dtype)
    x = rng.standard_normal((B, T, cfg.d_model)).astype(dtype)
    state = None
    if pos is not None:
        state = Ti.init_state(params, cfg, B)
        for k in state:
            if k != "pos":
                state[k] = (0.5 * rng.standard_normal(state[k].shape)).astype(dtype)
        state["pos"] = pos
    return params, x, state


def _cfg(**kw):
    base = dict(d_model=4, n_heads=2, hidden=3, eta_max=1.0)
    base.update(kw)
    return Ti.TitansConfig(**base)


configs = st.fixed_dictionaries(
    {
        "memory": st.sampled_from(["matrix", "mlp"]),
        "momentum": st.booleans(),
        "retention": st.booleans(),
        "chunk": st.integers(1, 5),
        "n_heads": st.sampled_from([1, 2]),
        "layernorm": st.booleans(),
        "act": st.sampled_from(["gelu", "silu"]),
        "impl": st.sampled_from(["chunked", "loop"]),
    }
)


# ---------------------------------------------------------------------------------------------
# Gradient checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(Ti_cases.GRADCHECKS))
def test_registered_gradchecks(name):
    rng = np.random.default_rng(7)
    loss, inputs, grads = Ti_cases.GRADCHECKS[name](rng)
    errors = check_gradients(loss, inputs, grads, rng)
    assert max(errors.values()) < GRAD_TOL, errors


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_gradcheck_every_parameter_state_and_input(memory, momentum, chunk):
    """Central differences on every entry of x, every parameter and (at C = 5, from a mid-chunk
    incoming state) every state array; T = 7 is not a multiple of 2 or 5."""
    cfg = _cfg(memory=memory, momentum=momentum, chunk=chunk)
    pos = 3 if chunk == 5 else None
    params, x, state = _setup(cfg, T=7, seed=chunk, pos=pos)
    u = np.random.default_rng(1).standard_normal(x.shape)
    inputs = {"x": x, **params}
    if state is not None:
        inputs.update({"state." + k: v for k, v in state.items() if k != "pos"})

    def loss(inp):
        prm = {k: v for k, v in inp.items() if k in params}
        st_ = None if state is None else {"pos": pos, **{k[6:]: v for k, v in inp.items() if k.startswith("state.")}}
        return np.sum(Ti.titans_forward(inp["x"], prm, cfg, st_)[0] * u)

    _, cache, _ = Ti.titans_forward(x, params, cfg, state)
    dx, dparams, dstate0 = Ti.titans_backward(u, cache)
    grads = {"x": dx, **dparams}
    if dstate0 is not None:
        grads.update({"state." + k: v for k, v in dstate0.items()})
        assert set(grads) == set(inputs)
    errors = check_gradients(loss, inputs, grads, np.random.default_rng(2))
    assert max(errors.values()) < GRAD_TOL, errors
    # the write-only parameters really are exercised (not trivially zero)
    for key in ("W_k", "W_v", "w_eta"):
        assert np.abs(dparams[key]).max() > 1e-6


@given(cfg=configs, T=st.integers(1, 8), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_dot_product_test_random_configs(cfg, T, with_state, seed):
    """The adjoint identity along a random direction over x, every parameter and the state."""
    cfg = _cfg(**cfg)
    pos = seed % cfg.chunk if with_state else None
    params, x, state = _setup(cfg, T=T, seed=seed, pos=pos)
    note(f"{cfg}, T={T}, pos={pos}")
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(x.shape)
    _, cache, _ = Ti.titans_forward(x, params, cfg, state)
    dx, dparams, dstate0 = Ti.titans_backward(u, cache)
    inputs = {"x": x, **params, **({} if state is None else {"s." + k: v for k, v in state.items() if k != "pos"})}
    grads = {"x": dx, **dparams, **({} if dstate0 is None else {"s." + k: v for k, v in dstate0.items()})}

    def loss(inp):
        st_ = None if state is None else {"pos": pos, **{k[2:]: v for k, v in inp.items() if k.startswith("s.")}}
        return np.sum(Ti.titans_forward(inp["x"], {k: inp[k] for k in params}, cfg, st_)[0] * u)

    err = dot_product_test(loss, inputs, grads, rng)
    note(f"dot error {err:.2e}")
    assert err < GRAD_TOL


def test_gradcheck_catches_a_wrong_write_gradient(monkeypatch):
    """The checks can fail: a backward that drops the second-order term of the inner gradient
    (the VJP through M_b inside grad l(M_b; k, v)) is caught."""
    cfg = _cfg(memory="mlp", chunk=2)
    real = Ti.inner_grad_backward

    def wrong(cfg_, dfac, cache):
        dWb, dk, dv = real(cfg_, dfac, cache)
        return {n: 0 * g for n, g in dWb.items()}, dk, dv

    monkeypatch.setattr(Ti, "inner_grad_backward", wrong)
    loss, inputs, grads = Ti_cases.gradcheck_case(np.random.default_rng(0), cfg, T=5)
    errors = check_gradients(loss, inputs, grads, np.random.default_rng(1), keys=["W1_0", "W2_0"])
    assert max(errors.values()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Chunk-parallel form == token loop (forward, final state, every gradient)
# ---------------------------------------------------------------------------------------------


@given(cfg=configs, T=st.integers(1, 9), with_state=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float64, np.float32]), stop=st.booleans())
def test_chunked_equals_token_loop(cfg, T, with_state, seed, dtype, stop):
    cfg = _cfg(**cfg, stop_grad_writes=stop)
    pos = seed % cfg.chunk if with_state else None
    params, x, state = _setup(cfg, T=T, seed=seed, pos=pos, dtype=dtype)
    note(f"{cfg}, T={T}, pos={pos}, {np.dtype(dtype).name}")
    rng = np.random.default_rng(seed + 1)
    dy = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for impl in ("loop", "chunked"):
        c = replace(cfg, impl=impl)
        y, cache, out = Ti.titans_forward(x, params, c, state)
        dstate = {k: (0.5 * np.random.default_rng(seed + 2).standard_normal(v.shape)).astype(dtype)
                  for k, v in out.items() if k != "pos"}
        dx, dparams, dstate0 = Ti.titans_backward(dy, cache, dstate)
        results.append((y, out, dx, dparams, dstate0))
    (y0, s0, dx0, p0, d0), (y1, s1, dx1, p1, d1) = results
    assert y1.dtype == dtype and dx1.dtype == dtype
    assert_close(y1, y0, dtype, "rewrite", "y")
    assert s1["pos"] == s0["pos"] == ((pos or 0) + T) % cfg.chunk
    for k in s0:
        if k != "pos":
            assert s1[k].dtype == dtype
            assert_close(s1[k], s0[k], dtype, "rewrite", f"state {k}")
    assert_close(dx1, dx0, dtype, "rewrite", "dx")
    for k in p0:
        assert p1[k].dtype == dtype, k
        assert_close(p1[k], p0[k], dtype, "rewrite", f"d{k}")
    assert (d0 is None) == (d1 is None) == (state is None)
    for k in d0 or {}:
        assert_close(d1[k], d0[k], dtype, "rewrite", f"dstate {k}")


# ---------------------------------------------------------------------------------------------
# Streaming: one call == chained calls carrying the state, at any split point
# ---------------------------------------------------------------------------------------------


@given(cfg=configs, T=st.integers(2, 9), split=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_one_call_equals_chained_calls(cfg, T, split, seed):
    """Forward and backward: outputs, final state, and (backpropagating the second call's state
    gradient into the first call) every parameter gradient and dx."""
    cfg = _cfg(**cfg)
    split = min(split, T - 1)
    params, x, _ = _setup(cfg, T=T, seed=seed)
    note(f"{cfg}, T={T}, split={split}")
    dy = np.random.default_rng(seed).standard_normal(x.shape)
    y, cache, s_full = Ti.titans_forward(x, params, cfg)
    dx, dp, _ = Ti.titans_backward(dy, cache)
    ya, ca, sa = Ti.titans_forward(x[:, :split], params, cfg)
    yb, cb, sb = Ti.titans_forward(x[:, split:], params, cfg, sa)
    assert_close(np.concatenate([ya, yb], axis=1), y, np.float64, "rewrite", "y")
    assert sb["pos"] == s_full["pos"]
    for k in s_full:
        if k != "pos":
            assert_close(sb[k], s_full[k], np.float64, "rewrite", f"state {k}")
    dxb, dpb, dsa = Ti.titans_backward(dy[:, split:], cb)
    dxa, dpa, none = Ti.titans_backward(dy[:, :split], ca, dsa)
    assert none is None
    assert_close(np.concatenate([dxa, dxb], axis=1), dx, np.float64, "rewrite", "dx")
    for k in dp:
        assert_close(dpa[k] + dpb[k], dp[k], np.float64, "rewrite", f"d{k}")


def test_state_carries_the_partial_chunk():
    """Splitting inside a chunk: the second call must read the chunk-start state, not the running
    one (a state that dropped M_b would differ)."""
    cfg = _cfg(chunk=4, eta_max=1.0)
    params, x, _ = _setup(cfg, T=8)
    y, _, _ = Ti.titans_forward(x, params, cfg)
    _, _, sa = Ti.titans_forward(x[:, :2], params, cfg)
    assert sa["pos"] == 2 and not np.allclose(sa["M"], sa["M_b"])
    yb, _, _ = Ti.titans_forward(x[:, 2:], params, cfg, sa)
    assert_close(yb, y[:, 2:], np.float64, "rewrite", "y")
    broken = dict(sa, M_b=sa["M"])  # a state without the partial chunk's start
    yb_bad, _, _ = Ti.titans_forward(x[:, 2:], params, cfg, broken)
    assert np.abs(yb_bad - y[:, 2:]).max() > 1e-6


# ---------------------------------------------------------------------------------------------
# Degenerate settings reproduce known rules (Titans App. C; reference/memory.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retention", [False, True])
@pytest.mark.parametrize("impl", ["loop", "chunked"])
def test_matrix_no_momentum_per_token_is_the_delta_rule(retention, impl):
    """Matrix memory, momentum off, C = 1: M_t = alpha_t M_{t-1} - eta_t 2 (M_{t-1} k_t - v_t) k_t^T,
    i.e. memory.delta_forward with eta' = 2 eta (its loss has 1/2) and alpha (Gated DeltaNet-like,
    Titans App. C) or alpha = 1 (the delta rule). Our read comes before the write and theirs after
    it, so our o_{t+1} = M_t q_{t+1} is their y_t with the queries shifted by one."""
    cfg = _cfg(chunk=1, momentum=False, retention=retention, n_heads=1, impl=impl)
    rng = np.random.default_rng(3)
    B, T, d = 2, 7, cfg.head_dim
    q, k, v = (rng.standard_normal((B, 1, T, d)) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    eta = rng.uniform(0.05, 0.5, (B, 1, T))
    alpha = rng.uniform(0.5, 1.0, (B, 1, T)) if retention else np.ones((B, 1, T))
    M0 = rng.standard_normal((B, 1, d, d))
    mem = {"M": M0, "M_b": M0, "pos": 0}
    fwd, bwd = ((Ti.memory_loop_forward, Ti.memory_loop_backward) if impl == "loop"
                else (Ti.memory_chunked_forward, Ti.memory_chunked_backward))
    o, cache, out = fwd(q, k, v, alpha, np.zeros_like(eta), eta, mem, cfg)
    q_next = np.concatenate([q[:, 0, 1:], q[:, 0, :1]], axis=1)  # their y_t reads q_{t+1}
    y, M_T, dcache = mem_rules.delta_forward(q_next, k[:, 0], v[:, 0], 2 * eta[:, 0],
                                             alpha[:, 0] if retention else None, M0[:, 0])
    assert_close(o[:, 0, 1:], y[:, :-1], np.float64, "rewrite", "reads")
    assert_close(o[:, 0, 0], np.einsum("bvk,bk->bv", M0[:, 0], q[:, 0, 0]), np.float64, "rewrite", "o_0")
    assert_close(out["M"][:, 0], M_T, np.float64, "rewrite", "final state")
    # gradients through the writes agree with the delta rule's hand-written backward
    do = rng.standard_normal(o.shape)
    do[:, :, 0] = 0.0
    dM_T = rng.standard_normal(M_T.shape)
    dq, dk, dv, dalpha, _, deta, dmem0 = bwd(do, cache, {"M": dM_T[:, None]})
    dy = np.concatenate([do[:, 0, 1:], np.zeros_like(do[:, 0, :1])], axis=1)
    g = mem_rules.delta_backward(dy, dM_T, dcache)
    assert_close(dk[:, 0], g["k"], np.float64, "rewrite", "dk")
    assert_close(dv[:, 0], g["v"], np.float64, "rewrite", "dv")
    assert_close(deta[:, 0], 2 * g["eta"], np.float64, "rewrite", "deta")
    assert_close(dmem0["M"][:, 0] + dmem0["M_b"][:, 0], g["M0"], np.float64, "rewrite", "dM0")
    if retention:
        assert_close(dalpha[:, 0], g["alpha"], np.float64, "rewrite", "dalpha")


def test_zero_learning_rate_and_full_retention_leave_the_memory_unchanged():
    cfg = _cfg(memory="mlp", eta_max=0.0, retention=False, chunk=3)
    params, x, _ = _setup(cfg, T=7)
    _, _, out = Ti.titans_forward(x, params, cfg)
    for n in ("W1", "W2"):
        np.testing.assert_array_equal(out[n], np.broadcast_to(params[n + "_0"], out[n].shape))
        np.testing.assert_array_equal(out["S_" + n], 0.0)


# ---------------------------------------------------------------------------------------------
# stop_grad_writes
# ---------------------------------------------------------------------------------------------

WRITE_ONLY = ("W_k", "W_v", "conv_k", "conv_v", "w_eta", "b_eta", "w_alpha", "b_alpha", "w_beta", "b_beta")


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_stop_grad_writes_zeroes_write_only_parameters(memory):
    cfg = _cfg(memory=memory, chunk=2)
    params, x, _ = _setup(cfg, T=7)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    for stop in (False, True):
        c = replace(cfg, stop_grad_writes=stop)
        _, cache, _ = Ti.titans_forward(x, params, c)
        _, dp, _ = Ti.titans_backward(dy, cache)
        for key in WRITE_ONLY:
            if stop:
                np.testing.assert_array_equal(dp[key], 0.0, err_msg=key)
            else:
                assert np.abs(dp[key]).max() > 1e-8, f"default gives {key} no gradient"
        for key in ("W_q", "W_o", "W_g", "g_o"):  # the read path is kept
            assert np.abs(dp[key]).max() > 1e-8


def test_stop_grad_writes_is_exact_when_the_writes_vanish():
    """With eta = 0 and no retention the state never moves: the first-order variant and the exact
    gradient coincide (for every parameter, including the initial memory)."""
    cfg = _cfg(memory="mlp", eta_max=0.0, retention=False, chunk=2)
    params, x, _ = _setup(cfg, T=6)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    out = []
    for stop in (False, True):
        _, cache, _ = Ti.titans_forward(x, params, replace(cfg, stop_grad_writes=stop))
        out.append(Ti.titans_backward(dy, cache))
    assert_close(out[1][0], out[0][0], np.float64, "rewrite", "dx")
    for k in out[0][1]:
        assert_close(out[1][1][k], out[0][1][k], np.float64, "rewrite", k)


def test_stop_grad_writes_is_not_the_default():
    assert Ti.TitansConfig(d_model=4).stop_grad_writes is False


# ---------------------------------------------------------------------------------------------
# Stability, batch independence, dtypes, bad input, no mutation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_float32_4096_tokens_at_default_gates_is_finite(memory):
    cfg = Ti.TitansConfig(d_model=8, n_heads=2, memory=memory)  # default gates, chunk 16
    rng = np.random.default_rng(0)
    params = Ti.init_params(cfg, rng, np.float32)
    x = rng.standard_normal((1, 4096, 8)).astype(np.float32)
    y, _, state = Ti.titans_forward(x, params, cfg)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))
    for k, v in state.items():
        if k != "pos":
            assert v.dtype == np.float32 and np.all(np.isfinite(v)), k
    assert np.abs(y).max() < 1e3  # bounded, not merely finite


def test_sequences_in_a_batch_are_independent():
    cfg = _cfg(memory="mlp", chunk=3)
    params, x, _ = _setup(cfg, B=3, T=7)
    y, _, s = Ti.titans_forward(x, params, cfg)
    y1, _, s1 = Ti.titans_forward(x[1:2], params, cfg)
    assert_close(y1, y[1:2], np.float64, "rewrite", "y")
    assert_close(s1["W1"], s["W1"][1:2], np.float64, "rewrite", "W1")


def _bad_inputs():
    cfg = _cfg()
    params, x, state = _setup(cfg, T=3, pos=1)
    yield "x", x[0], params, state, cfg
    yield "x", x[..., :3], params, state, cfg
    yield "x", x.astype(np.int64), params, state, cfg
    yield "W_q", x, {k: v for k, v in params.items() if k != "W_q"}, state, cfg
    yield "W_k", x, dict(params, W_k=params["W_k"][:, :3]), state, cfg
    yield "M0", x, dict(params, M0=params["M0"].astype(np.float32)), state, cfg
    yield "M_b", x, params, dict(state, M_b=state["M_b"][:1]), cfg
    yield "conv_q", x, params, dict(state, conv_q=state["conv_q"][:, :1]), cfg
    yield "pos", x, params, dict(state, pos=cfg.chunk), cfg


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_bad_input_raises_value_error_naming_the_argument(case):
    name, x, params, state, cfg = case
    with pytest.raises(ValueError, match=name):
        Ti.titans_forward(x, params, cfg, state)


def test_bad_config_and_dy_raise():
    with pytest.raises(ValueError, match="n_heads"):
        Ti.TitansConfig(d_model=5, n_heads=2)
    with pytest.raises(ValueError, match="memory"):
        Ti.TitansConfig(d_model=4, memory="deep")
    cfg = _cfg()
    params, x, _ = _setup(cfg, T=3)
    _, cache, _ = Ti.titans_forward(x, params, cfg)
    with pytest.raises(ValueError, match="dy"):
        Ti.titans_backward(np.zeros((2, 4, 4)), cache)


@pytest.mark.parametrize("impl", ["loop", "chunked"])
def test_inputs_are_not_mutated_and_outputs_do_not_alias_them(impl):
    cfg = _cfg(memory="mlp", chunk=3, impl=impl)
    params, x, state = _setup(cfg, T=5, pos=1)
    frozen = [x, *params.values(), *(v for k, v in state.items() if k != "pos")]
    for a in frozen:
        a.setflags(write=False)  # any in-place write raises
    y, cache, out = Ti.titans_forward(x, params, cfg, state)
    dstate = {k: np.ones_like(v) for k, v in out.items() if k != "pos"}
    for a in dstate.values():
        a.setflags(write=False)
    dy = np.ones_like(y)
    dy.setflags(write=False)
    Ti.titans_backward(dy, cache, dstate)
    for k, v in out.items():
        if k != "pos":
            assert not any(np.shares_memory(v, a) for a in frozen), k
