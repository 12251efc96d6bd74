"""Tests of reference/selfmod.py: self-modifying Titans (SPEC.md#selfmod).

Gradient checks: the layer is analytic, so per-key numerical gradients use the complex step (exact
to rounding; central differences at e = 1e-6 cannot resolve the keys whose gradient is ~1e-7 of the
loss, e.g. the momentum decay of a gate memory: measured rounding error ~1e-4 relative there), and
the whole gradient is also checked by the dot-product test with central differences. Where a case
is large, the per-key check samples ``N_ENTRIES`` entries of each key deterministically (the
dot-product test still covers every entry).
"""

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st
from tolerances import assert_close, tol

from nlref.reference import memory as MEM
from nlref.reference import selfmod as SM
from nlref.reference.cases.selfmod import GRADCHECKS, example_params
from nlref.reference.gradcheck import (
    check_gradients,
    dot_product_test,
    numerical_gradient,
    rel_error,
)

N_ENTRIES = 3  # entries per key in the sampled complex-step checks


def _cfg(**kw):
    base = {"d_model": 4, "n_heads": 2, "hidden": 3, "eta_max": 1.0}  # strong writes: every path matters
    base.update(kw)
    return SM.SelfModConfig(**base)


def _setup(cfg, T=7, B=2, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = example_params(cfg, rng, dtype)
    x = rng.standard_normal((B, T, cfg.d_model)).astype(dtype)
    return rng, params, x


def _loss_fn(cfg, u, state=None, fwd=SM.forward):
    def loss(inputs):
        inputs = dict(inputs)
        x = inputs.pop("x")
        s = None
        if state is not None:
            s = {k: v.astype(x.dtype) if isinstance(v, np.ndarray) else v for k, v in state.items()}
        return np.sum(fwd(x, inputs, cfg, s)[0] * u)

    return loss


def _complex_step_sampled(loss, inputs, grads, rng, n_entries=N_ENTRIES):
    """Per-key relative error of ``grads`` vs the complex step on ``n_entries`` sampled entries."""
    work = {k: np.array(v, dtype=np.complex128) for k, v in inputs.items()}
    errors = {}
    for key in grads:
        flat = work[key].reshape(-1)
        idx = rng.choice(flat.size, size=min(n_entries, flat.size), replace=False)
        num = np.zeros(idx.size)
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + 1e-30j
            num[j] = np.imag(loss(work)) / 1e-30
            flat[i] = old
        ana = np.asarray(grads[key]).reshape(-1)[idx]
        # scale: the key's own largest gradient, so a key is judged against itself (rel_error's rule)
        scale = max(float(np.max(np.abs(grads[key]))), 1e-12)
        errors[key] = float(np.max(np.abs(ana - num))) / scale
    return errors


def _check_layer_gradients(cfg, T, seed, with_state=False, sampled=True, loop=False, property_draw=False):
    """Complex step per key and central-difference dot-product test of ``backward`` on a cache of
    the chunk form (``write_chunk_backward``) or, with ``loop``, of the token loop."""
    fwd = SM.forward_loop if loop else SM.forward
    rng, params, x = _setup(cfg, T=T, seed=seed)
    state = None
    if with_state:
        state = SM.forward(rng.standard_normal((x.shape[0], 3, cfg.d_model)), params, cfg)[2]
    y, cache, _ = fwd(x, params, cfg, state)
    u = rng.standard_normal(y.shape)
    dx, dparams, _ = SM.backward(u, cache)
    inputs, grads = {"x": x, **params}, {"x": dx, **dparams}
    loss = _loss_fn(cfg, u, state, fwd)
    if sampled:
        errors = _complex_step_sampled(loss, inputs, grads, rng)
    else:
        num = numerical_gradient(loss, inputs, method="complex")
        errors = {k: rel_error(grads[k], num[k]) for k in grads}
    dot = dot_product_test(loss, inputs, grads, rng)
    if property_draw and not all(np.isfinite(e) for e in errors.values()):
        # the complex step itself overflowed: a gate pre-activation beyond ~700 makes the complex
        # sigmoid exp(-z) inf (inf/inf = nan) while the real forward and backward stay finite
        # (measured: seed 2980 of the property, eta_max = 1 strong writes). Such a draw checks
        # nothing; a non-finite analytic gradient or forward is still a failure below.
        assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads.values()), "non-finite backward"
        assume(False)
    assert all(np.isfinite(e) for e in errors.values()) and np.isfinite(dot), (errors, dot)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol("float64", "complex_step"), f"{worst}: {errors[worst]:.2e} ({errors})"
    assert dot <= tol("float64", "gradcheck"), f"dot-product test {dot:.2e}"
    # every parameter, every initial state and the input receive a gradient that is checked
    assert set(grads) == set(SM.param_shapes(cfg)) | {"x"}
    return errors, dot


# ---------------------------------------------------------------------------------------------
# Gradient checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradchecks_registered_cases(name):
    # what `nested-learning check` runs: the complex step on every key (the case asks for it), and
    # the central-difference dot-product test over all inputs at once
    rng = np.random.default_rng(7)
    make = GRADCHECKS[name]
    assert make.method == "complex"
    loss, inputs, grads = make(rng)
    assert set(grads) == set(inputs)  # every parameter, the input (and no key left out)
    errors = check_gradients(loss, inputs, grads, rng, method="complex")
    assert errors.pop("<dot>") <= tol("float64", "gradcheck")
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol("float64", "complex_step"), (worst, errors[worst])


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("memory", ["mlp", "matrix"])
def test_gradcheck_grid_memory_momentum_chunk(memory, momentum, chunk):
    # T = 7 is a multiple of none of 2, 5; chunk_other differs from chunk_memory
    other = {1: 2, 2: 5, 5: 1}[chunk]
    cfg = _cfg(memory=memory, momentum=momentum, chunk_memory=chunk, chunk_other=other)
    _check_layer_gradients(cfg, T=7, seed=chunk)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("memory", ["mlp", "matrix"])
def test_gradcheck_step_norm(memory, momentum, chunk):
    """step_norm's scale s_t = 1 / (1 + eta_t C lambda_t) is differentiated through eta_t, k_t and the
    chunk-start weights (lambda_t's a_t = s(W2 k_t) and ||W1||_F^2), on both forms."""
    cfg = _cfg(memory=memory, momentum=momentum, chunk_memory=chunk, chunk_other=chunk + 1, step_norm=True)
    for loop in (False, True):
        _check_layer_gradients(cfg, T=7, seed=chunk, loop=loop)


@st.composite
def configs(draw):
    memory = draw(st.sampled_from(["mlp", "matrix"]))
    kw = {
        "memory": memory,
        "momentum": draw(st.booleans()),
        "adaptive_q": draw(st.booleans()),
        "chunk_memory": draw(st.integers(1, 5)),
        "chunk_other": draw(st.integers(1, 5)),
        "n_heads": draw(st.sampled_from([1, 2])),
        "single_shrink": memory == "matrix" and draw(st.booleans()),
        "act": draw(st.sampled_from(["gelu", "silu"])),
        "dgd": draw(st.sampled_from([True, True, False])),  # False: Table 6 "w/o DGD"
        "retention": draw(st.sampled_from([True, True, False])),  # False: Table 6 "w/o weight decay"
        # False: Table 6 "w/o inner-projection k" / "v" (static k / v, no M_k / M_v)
        "adaptive_k": draw(st.sampled_from([True, True, True, False])),
        "adaptive_v": draw(st.sampled_from([True, True, True, False])),
        # True: the curvature-normalised step (SPEC.md#hope-stability)
        "step_norm": draw(st.sampled_from([False, False, True])),
    }
    return _cfg(**kw)


@given(cfg=configs(), T=st.integers(1, 7), seed=st.integers(0, 2**16), with_state=st.booleans(),
       loop=st.booleans())
def test_gradcheck_property(cfg, T, seed, with_state, loop):
    note(str(cfg))
    _check_layer_gradients(cfg, T=T, seed=seed, with_state=with_state, loop=loop, property_draw=True)


# ---------------------------------------------------------------------------------------------
# One memory's writes: the closed form == the token loop, each backward exact
# ---------------------------------------------------------------------------------------------


def _write_inputs(rng, n, keyside, momentum, dtype=np.float64):
    B, H, a, b = 2, 2, 3, 2  # a weight (a, b); the key (b,)
    P0, S0 = (rng.standard_normal((B, H, a, b)).astype(dtype) for _ in range(2))
    G = rng.standard_normal((B, H, n, a, b)).astype(dtype)
    k = rng.standard_normal((B, H, n, b)).astype(dtype)
    ep, alpha = rng.uniform(0, 0.5, (B, H, n)).astype(dtype), rng.uniform(0.5, 1, (B, H, n)).astype(dtype)
    beta = rng.uniform(0.2, 0.9, H).astype(dtype) if momentum else None
    return {"Pw": P0, "S": S0 if momentum else np.zeros_like(S0), "G": G, "k": k, "ep": ep, "alpha": alpha,
            "beta": beta}  # fmt: skip


@given(n=st.integers(1, 6), keyside=st.booleans(), momentum=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float64", "float32"]))  # fmt: skip
def test_write_chunk_equals_write_tokens(n, keyside, momentum, seed, dtype):
    # the closed form (Titans Eqs. 16-18 generalised to DGD) == write applied token by token, and
    # write_chunk_backward == write_tokens_backward (write_backward from the last token to the first)
    rng = np.random.default_rng(seed)
    a = _write_inputs(rng, n, keyside, momentum, np.dtype(dtype))
    args = (a["Pw"], a["S"], a["G"], a["k"], a["ep"], a["alpha"], a["beta"], keyside)
    P1, S1, c1 = SM.write_chunk(*args)
    P2, S2, c2 = SM.write_tokens(*args)
    assert_close(P1, P2, dtype, "rewrite", "P")
    assert_close(S1, S2, dtype, "rewrite", "S")
    dP = rng.standard_normal(P1.shape).astype(dtype)
    dS = rng.standard_normal(S1.shape).astype(dtype) if momentum else None
    g1 = SM.write_chunk_backward(dP, dS, c1)
    g2 = SM.write_tokens_backward(dP, None if dS is None else dS.copy(), c2)
    for name, u, v in zip(("dPw", "dS", "dG", "dk", "dep", "dalpha", "dbeta"), g1, g2, strict=True):
        if u is None or v is None:
            assert u is None and v is None and not momentum, name
            continue
        assert_close(u, v, dtype, "rewrite", name)


@pytest.mark.parametrize("form", ["write", "write_tokens", "write_chunk"])
@pytest.mark.parametrize("keyside", [True, False])
@pytest.mark.parametrize("momentum", [True, False])
def test_write_backwards_pass_the_complex_step(form, keyside, momentum):
    # each write's hand-written VJP against the complex step on every entry (the writes are analytic)
    rng = np.random.default_rng(3)
    n = 1 if form == "write" else 4
    inputs = _write_inputs(rng, n, keyside, momentum)
    if form == "write":  # one token: drop the token axis
        inputs = {k: v if v is None or k in ("Pw", "S", "beta") else v[:, :, 0] for k, v in inputs.items()}
    fwd, bwd = getattr(SM, form), getattr(SM, form + "_backward")
    beta = inputs.pop("beta")
    P1, S1, c = fwd(*inputs.values(), beta, keyside)
    dP, dS = rng.standard_normal(P1.shape), rng.standard_normal(S1.shape)
    dPw, dS0, dG, dk, dep, dalpha, dbeta = bwd(dP, dS if momentum else None, c)
    grads = {"Pw": dPw, "G": dG, "ep": dep, "alpha": dalpha}
    if keyside:
        grads["k"] = dk
    else:
        assert np.all(dk == 0)
    if momentum:
        grads.update(S=dS0, beta=dbeta)
        inputs["beta"] = beta
    else:
        assert dS0 is None and dbeta is None
    fixed = {k: v for k, v in inputs.items() if k not in grads}

    def loss(x):
        x = {**fixed, **x}
        P, S, _ = fwd(x["Pw"], x["S"], x["G"], x["k"], x["ep"], x["alpha"], x.get("beta"), keyside)
        return np.sum(P * dP) + (np.sum(S * dS) if momentum else 0.0)

    num = numerical_gradient(loss, {k: inputs[k] for k in grads}, method="complex")
    errors = {k: rel_error(grads[k], num[k]) for k in grads}
    assert max(errors.values()) <= tol("float64", "complex_step"), errors


def test_the_dgd_step_is_memory_py_s():
    # Hope's eta' is reference.memory's DGD prox step (Eq. 57), not a copy of it
    cfg = _cfg(chunk_memory=2, chunk_other=3)
    _, params, x = _setup(cfg, T=5)
    for fwd in (SM.forward, SM.forward_loop):
        cache = fwd(x, params, cfg)[1]
        np.testing.assert_array_equal(cache["ep"], MEM.prox_step_size(cache["eta"], cache["k"]))


# ---------------------------------------------------------------------------------------------
# Chunk-parallel form == token loop; one call == chained calls
# ---------------------------------------------------------------------------------------------


def _state_arrays(state):
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


@given(cfg=configs(), T=st.integers(1, 9), seed=st.integers(0, 2**16), dtype=st.sampled_from(["float64", "float32"]))
def test_chunk_form_equals_token_loop(cfg, T, seed, dtype):
    rng, params, x = _setup(cfg, T=T, seed=seed, dtype=np.dtype(dtype))
    y1, c1, s1 = SM.forward(x, params, cfg)
    y2, c2, s2 = SM.forward_loop(x, params, cfg)
    assert y1.dtype == np.dtype(dtype)
    assert_close(y1, y2, dtype, "rewrite", "y")
    for key, val in _state_arrays(s1).items():
        assert_close(val, s2[key], dtype, "rewrite", f"state {key}")
    assert (s1["pos_other"], s1["pos_memory"]) == (s2["pos_other"], s2["pos_memory"])
    u = rng.standard_normal(y1.shape).astype(dtype)
    dx1, g1, _ = SM.backward(u, c1)
    dx2, g2, _ = SM.backward(u, c2)
    assert_close(dx1, dx2, dtype, "rewrite", "dx")
    for key in g1:
        assert_close(g1[key], g2[key], dtype, "rewrite", key)


def test_chunk_form_differs_from_per_token_model():
    # the chunk size is part of the definition: C = 3 and C = 1 are different functions
    _, params, x = _setup(_cfg(), T=6)
    y3 = SM.forward(x, params, _cfg(chunk_memory=3, chunk_other=3))[0]
    y1 = SM.forward(x, params, _cfg(chunk_memory=1, chunk_other=1))[0]
    assert np.max(np.abs(y3 - y1)) > 1e-3


@given(cfg=configs(), T=st.integers(1, 9), split=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_one_call_equals_chained_calls(cfg, T, split, seed):
    split = min(split, T)
    rng, params, x = _setup(cfg, T=T, seed=seed)
    y, cache, s = SM.forward(x, params, cfg)
    ya, ca, sa = SM.forward(x[:, :split], params, cfg)
    yb, cb, sb = SM.forward(x[:, split:], params, cfg, sa)
    assert_close(np.concatenate([ya, yb], axis=1), y, "float64", "rewrite", "y")
    for key, val in _state_arrays(s).items():
        assert_close(sb[key], val, "float64", "rewrite", f"state {key}")
    assert (sb["pos_other"], sb["pos_memory"]) == (s["pos_other"], s["pos_memory"])
    # the backward chains too: the second call's state gradient feeds the first call's backward
    u = rng.standard_normal(y.shape)
    dx, g, _ = SM.backward(u, cache)
    dxb, gb, dstate = SM.backward(u[:, split:], cb)
    dxa, ga, _ = SM.backward(u[:, :split], ca, dstate)
    assert_close(np.concatenate([dxa, dxb], axis=1), dx, "float64", "rewrite", "dx")
    for key in g:
        assert_close(ga[key] + gb[key], g[key], "float64", "rewrite", key)


def test_sequences_in_a_batch_are_independent():
    cfg = _cfg(chunk_memory=3, chunk_other=2)
    _, params, x = _setup(cfg, T=5)
    y, _, s = SM.forward(x, params, cfg)
    for b in range(x.shape[0]):
        yb, _, sb = SM.forward(x[b : b + 1], params, cfg)
        assert_close(yb, y[b : b + 1], "float64", "rewrite", f"y[{b}]")
        for key, val in _state_arrays(sb).items():
            assert_close(val, s[key][b : b + 1], "float64", "rewrite", f"state {key}[{b}]")


def test_streaming_state_gradient_is_exact():
    # dstate0 (the gradient w.r.t. the input state) against the complex step on the state entries
    cfg = _cfg(chunk_memory=3, chunk_other=2)
    rng, params, x = _setup(cfg, T=4)
    state = SM.forward(rng.standard_normal((2, 4, cfg.d_model)), params, cfg)[2]  # mid-chunk
    y, cache, _ = SM.forward(x, params, cfg, state)
    u = rng.standard_normal(y.shape)
    _, _, dstate = SM.backward(u, cache)
    arrays = _state_arrays(state)

    def loss(inputs):
        s = dict(state)
        s.update(inputs)
        xx = x.astype(np.complex128)
        p = {k: v.astype(np.complex128) for k, v in params.items()}
        s = {k: v.astype(np.complex128) if isinstance(v, np.ndarray) else v for k, v in s.items()}
        return np.sum(SM.forward(xx, p, cfg, s)[0] * u)

    errors = _complex_step_sampled(loss, arrays, dstate, rng)
    assert max(errors.values()) <= tol("float64", "complex_step"), errors


# ---------------------------------------------------------------------------------------------
# Degenerate settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retention_one", [True, False])
def test_single_shrink_matrix_c1_is_dgd_of_memory_py(retention_one):
    # matrix memory, single shrink, no momentum, C = 1: M_memory follows the DGD rule of
    # reference/memory.py onto the self-generated targets v_hat = M_{t-1} v_t (Eqs. 56-57, 88)
    cfg = _cfg(n_heads=1, memory="matrix", single_shrink=True, momentum=False, chunk_memory=1, chunk_other=2)
    rng, params, x = _setup(cfg, T=7)
    if retention_one:
        params["b_alpha"] = np.full_like(params["b_alpha"], np.inf)  # alpha = 1 exactly
    y, cache, state = SM.forward(x, params, cfg)
    k, q = cache["k"][:, 0], cache["q"][:, 0]  # (B, T, dh)
    vhat = cache["vhat"]["memory"][:, 0]
    eta, alpha = cache["eta"][:, 0], cache["alpha"][:, 0]
    if retention_one:
        assert np.all(alpha == 1.0)
    M0 = np.broadcast_to(params["memory.M0"][0], (x.shape[0],) + params["memory.M0"].shape[1:]).copy()
    # memory.py reads after the write (y_t = M_t q_t); this layer reads before it (o_t = M_{t-1} q_t):
    # feed memory.py the next token's query so its y_t is this layer's o_{t+1}
    q_next = np.concatenate([q[:, 1:], np.zeros_like(q[:, :1])], axis=1)
    y_dgd, M_T, _ = MEM.dgd_forward(q_next, k, vhat, eta, None if retention_one else alpha, M0)
    assert_close(state["memory.M"][:, 0], M_T, "float64", "rewrite", "final M_memory")
    assert_close(cache["o"][:, 0, 1:], y_dgd[:, :-1], "float64", "rewrite", "reads")


def test_zero_learning_rate_and_retention_one_leave_every_memory_at_its_initial_state():
    for memory in ("mlp", "matrix"):
        cfg = _cfg(memory=memory, chunk_memory=2, chunk_other=3, adaptive_q=True)
        _, params, x = _setup(cfg, T=7)
        params["b_eta"] = np.full_like(params["b_eta"], -np.inf)  # eta = 0
        params["b_alpha"] = np.full_like(params["b_alpha"], np.inf)  # alpha = 1
        _, cache, state = SM.forward(x, params, cfg)
        assert np.all(cache["eta"] == 0) and np.all(cache["alpha"] == 1)
        for m in cfg.memories:
            for w in SM.weights(cfg):
                init = np.broadcast_to(params[SM.init_key(m, w)], state[f"{m}.{w}"].shape)
                np.testing.assert_array_equal(state[f"{m}.{w}"], init)
                np.testing.assert_array_equal(state[f"{m}.S_{w}"], 0)
        # and a nonzero learning rate does move them
        params["b_eta"] = np.zeros_like(params["b_eta"])
        state = SM.forward(x, params, cfg)[2]
        assert np.max(np.abs(state["k." + SM.weights(cfg)[0]] - params[SM.init_key("k", SM.weights(cfg)[0])])) > 1e-3


# ---------------------------------------------------------------------------------------------
# stop_grad_writes
# ---------------------------------------------------------------------------------------------

WRITE_ONLY = ("w_eta", "b_eta", "w_alpha", "b_alpha", "conv_k", "conv_v")


def _write_only_keys(cfg):
    keys = list(WRITE_ONLY)
    for m in ("k", "v", "eta", "alpha"):
        keys += [SM.init_key(m, w) for w in SM.weights(cfg)]
    keys += [f"{m}.b_beta" for m in cfg.memories]
    return keys


@pytest.mark.parametrize("memory", ["mlp", "matrix"])
def test_stop_grad_writes_zero_for_write_only_parameters(memory):
    exact = _cfg(memory=memory, chunk_memory=2, chunk_other=2)
    first = _cfg(memory=memory, chunk_memory=2, chunk_other=2, stop_grad_writes=True)
    rng, params, x = _setup(exact, T=6)
    u = rng.standard_normal((2, 6, exact.d_model))
    g_exact = SM.backward(u, SM.forward(x, params, exact)[1])[1]
    g_first = SM.backward(u, SM.forward(x, params, first)[1])[1]
    for key in _write_only_keys(exact):
        assert np.max(np.abs(g_exact[key])) > 1e-9, f"default: {key} should get a gradient"
        assert np.all(g_first[key] == 0), f"stop_grad_writes: {key} should get none"
    # parameters on the read path still get a gradient
    for key in ("W_q", "conv_q", "W_o", SM.init_key("memory", SM.weights(exact)[0])):
        assert np.max(np.abs(g_first[key])) > 1e-6
    # q never enters a write, so W_q's gradient is the same; the main memory's initial state reaches
    # later chunks through the writes, so its first-order gradient differs from the exact one
    assert_close(g_first["W_q"], g_exact["W_q"], "float64", "rewrite", "W_q")
    key = SM.init_key("memory", SM.weights(exact)[0])
    assert np.max(np.abs(g_first[key] - g_exact[key])) > 1e-6


def test_stop_grad_writes_is_exact_when_the_writes_vanish():
    # eta = 0 and alpha = 1: every increment and its derivative vanish, so both gradients agree
    cfg = _cfg(chunk_memory=2, chunk_other=3)
    first = _cfg(chunk_memory=2, chunk_other=3, stop_grad_writes=True)
    rng, params, x = _setup(cfg, T=6)
    params["b_eta"] = np.full_like(params["b_eta"], -np.inf)
    params["b_alpha"] = np.full_like(params["b_alpha"], np.inf)
    u = rng.standard_normal((2, 6, cfg.d_model))
    dx1, g1, _ = SM.backward(u, SM.forward(x, params, cfg)[1])
    dx2, g2, _ = SM.backward(u, SM.forward(x, params, first)[1])
    assert_close(dx2, dx1, "float64", "rewrite", "dx")
    for key in g1:
        assert_close(g2[key], g1[key], "float64", "rewrite", key)


# ---------------------------------------------------------------------------------------------
# Stability, dtypes, validation, no mutation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["mlp", "matrix"])
def test_float32_forward_4096_tokens_default_gates_is_finite(memory):
    cfg = SM.SelfModConfig(d_model=8, n_heads=2, memory=memory)  # default gates and chunk sizes
    rng = np.random.default_rng(0)
    params = SM.init_params(cfg, rng, np.float32)
    x = rng.standard_normal((1, 4096, 8)).astype(np.float32)
    y, _, state = SM.forward(x, params, cfg)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y)) and np.max(np.abs(y)) < 1e3
    for key, val in _state_arrays(state).items():
        assert np.all(np.isfinite(val)) and np.max(np.abs(val)) < 1e3, key


def test_inputs_not_mutated_and_outputs_do_not_alias():
    cfg = _cfg(chunk_memory=2, chunk_other=3)
    rng, params, x = _setup(cfg, T=5)
    state = SM.forward(rng.standard_normal((2, 2, 4)), params, cfg)[2]
    frozen = [x, *params.values(), *_state_arrays(state).values()]
    copies = [a.copy() for a in frozen]
    for a in frozen:
        a.setflags(write=False)
    y, cache, new = SM.forward(x, params, cfg, state)
    u = rng.standard_normal(y.shape)
    u.setflags(write=False)
    SM.backward(u, cache)
    SM.forward_loop(x, params, cfg, state)
    for a, c in zip(frozen, copies, strict=True):
        np.testing.assert_array_equal(a, c)
    for key, val in _state_arrays(new).items():
        assert not np.shares_memory(val, state[key]), key


def test_bad_inputs_raise_value_error_naming_the_argument():
    cfg = _cfg()
    _, params, x = _setup(cfg, T=3)
    with pytest.raises(ValueError, match=r"x: expected .*\(B, T, D\)"):
        SM.forward(x[0], params, cfg)
    with pytest.raises(ValueError, match=r"x: expected .*D = 4"):
        SM.forward(x[:, :, :3], params, cfg)
    with pytest.raises(ValueError, match="x: expected dtype"):
        SM.forward(x.astype(np.int64), params, cfg)
    bad = dict(params)
    bad["W_q"] = params["W_q"][:, :3]
    with pytest.raises(ValueError, match=r"params\['W_q'\]: expected shape \(4, 4\)"):
        SM.forward(x, bad, cfg)
    bad = dict(params)
    del bad["memory.W1_0"]
    with pytest.raises(ValueError, match=r"params\['memory.W1_0'\]: missing"):
        SM.forward(x, bad, cfg)
    bad = dict(params)
    bad["g_o"] = params["g_o"].astype(np.float32)
    with pytest.raises(ValueError, match=r"params\['g_o'\]: expected dtype float64"):
        SM.forward(x, bad, cfg)
    state = SM.init_state(params, cfg, 3)  # batch 3 != 2
    with pytest.raises(ValueError, match=r"state\['k.W2'\]: expected shape \(2, 2, 3, 2\)"):
        SM.forward(x, params, cfg, state)
    cache = SM.forward(x, params, cfg)[1]
    with pytest.raises(ValueError, match=r"dy: expected .*\(2, 3, 4\)"):
        SM.backward(np.zeros((2, 3, 3)), cache)
    with pytest.raises(ValueError, match="single_shrink needs memory='matrix'"):
        _cfg(single_shrink=True)
    with pytest.raises(ValueError, match="d_model"):
        SM.SelfModConfig(d_model=5, n_heads=2)
    with pytest.raises(ValueError, match="chunk_memory"):
        _cfg(chunk_memory=0)


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_without_dgd_every_write_is_retention_plus_a_plain_gradient_step(memory):
    """Table 6 "w/o DGD" (``dgd=False``): at C = 1 without momentum each weight's write is
    ``alpha W - eta G`` (no k k^T shrink, eta not eta'), computed here from write()'s own pieces."""
    import dataclasses

    from nlref.reference import selfmod_memory as SMM

    cfg = _cfg(n_heads=1, memory=memory, momentum=False, chunk_memory=1, chunk_other=1, dgd=False)
    rng = np.random.default_rng(5)
    B, H, dh = 2, 1, cfg.head_dim
    for w in SMM.weights(cfg):
        assert not SMM.shrinks(cfg, w) and SMM.shrinks(dataclasses.replace(cfg, dgd=True), w) == SMM.keyside(w)
    Pw = rng.standard_normal((B, H, dh, dh))
    G = rng.standard_normal((B, H, dh, dh))
    k = rng.standard_normal((B, H, dh))
    eta, alpha = rng.uniform(0.05, 0.2, (B, H)), rng.uniform(0.8, 1.0, (B, H))
    new, _, _ = SMM.write(Pw, None, G, k, eta, alpha, None, SMM.shrinks(cfg, SMM.weights(cfg)[0]))
    np.testing.assert_allclose(new, alpha[..., None, None] * Pw - eta[..., None, None] * G, rtol=1e-14, atol=1e-15)
    params = SM.init_params(cfg, np.random.default_rng(0))
    x = rng.standard_normal((B, 3, cfg.d_model))
    pre = rng.standard_normal((B, H, 3, dh))
    _, _, eta_g, _, ep = SM.gates(params, cfg, pre, pre, rng.standard_normal((B, H, 3, dh)))
    np.testing.assert_array_equal(ep, eta_g)  # eta' = eta without DGD
    y_dgd, _, _ = SM.forward(x, params, dataclasses.replace(cfg, dgd=True))
    y, _, _ = SM.forward(x, params, cfg)
    assert np.abs(y - y_dgd).max() > 1e-8  # the switch changes the layer


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
@pytest.mark.parametrize("c", ["k", "v"])
def test_without_inner_projection_k_or_v_is_a_static_projection(c, memory):
    """Table 6 "w/o inner-projection k" / "v" (``adaptive_k`` / ``adaptive_v`` False): the layer's
    k (v) is l2(conv(x W_c^T)), computed here independently (the causal depthwise conv as a loop
    over lags, with the stream's conv history), exactly as q without ``adaptive_q``; the memory M_c,
    its parameters and state are gone, W_c (D, D) is an outer parameter, the other projection is
    still a memory's read, and the switch changes the layer."""
    import dataclasses

    cfg = _cfg(memory=memory, chunk_memory=2, chunk_other=3, **{f"adaptive_{c}": False})
    other = "v" if c == "k" else "k"
    assert c not in cfg.memories and c not in cfg.readers and other in cfg.memories
    assert cfg.static_projections == ("q", c) and not cfg.adaptive(c) and cfg.adaptive(other)
    shapes = SM.param_shapes(cfg)
    assert shapes[f"W_{c}"] == (cfg.d_model, cfg.d_model) and f"W_{other}" not in shapes
    assert not any(key.startswith(f"{c}.") for key in shapes)  # no {c}.M0 / W1_0, W2_0, b_beta
    default = SM.param_shapes(dataclasses.replace(cfg, **{f"adaptive_{c}": True}))
    assert set(default) - set(shapes) == {key for key in default if key.startswith(f"{c}.")}
    rng, params, x = _setup(cfg, T=7)
    state0 = SM.forward(rng.standard_normal((2, 2, cfg.d_model)), params, cfg)[2]  # a continued stream
    assert not any(key.startswith(f"{c}.") for key in state0)
    _, cache, state = SM.forward(x, params, cfg, state0)
    assert set(state) == set(state0)
    K, eps = cfg.conv_width, cfg.eps
    lin = x @ params[f"W_{c}"].T  # (B, T, D)
    xp = np.concatenate([state0[f"conv_{c}"], lin], axis=1)  # (B, K-1+T, D)
    conv = sum(params[f"conv_{c}"][:, j] * xp[:, j : j + x.shape[1]] for j in range(K))  # (B, T, D)
    h = conv.reshape(2, 7, cfg.n_heads, cfg.head_dim).transpose(0, 2, 1, 3)  # (B, H, T, dh)
    expect = h / np.sqrt(np.sum(h * h, axis=-1, keepdims=True) + eps)
    assert_close(cache[c], expect, "float64", "rewrite", c)
    np.testing.assert_array_equal(state[f"conv_{c}"], xp[:, -(K - 1):])
    # the loop form agrees, and the adaptive layer (same shared parameters, M_c added) differs
    assert_close(SM.forward_loop(x, params, cfg, state0)[1][c], expect, "float64", "rewrite", c)
    full = dataclasses.replace(cfg, **{f"adaptive_{c}": True})
    p_full = {**SM.init_params(full, np.random.default_rng(1)), **{k: v for k, v in params.items() if k in default}}
    assert np.abs(SM.forward(x, p_full, full)[1][c] - SM.forward(x, params, cfg)[1][c]).max() > 1e-3


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_without_retention_alpha_is_one(memory):
    """Table 6 "w/o weight decay" (``retention=False``): no M_alpha, no w_alpha / b_alpha, alpha = 1.
    The same layer with retention on and its gate pinned at sigmoid(60) = 1.0 (w_alpha = 0) computes
    the same outputs and the same new states of every other memory."""
    import dataclasses

    cfg = _cfg(n_heads=2, memory=memory, chunk_memory=2, chunk_other=3, retention=False)
    on = dataclasses.replace(cfg, retention=True)
    assert "alpha" not in cfg.memories and "w_alpha" not in SM.param_shapes(cfg)
    params = SM.init_params(cfg, np.random.default_rng(1))
    pinned = SM.init_params(on, np.random.default_rng(1))
    pinned.update({k: v for k, v in params.items()})  # the shared parameters equal
    pinned["w_alpha"], pinned["b_alpha"] = np.zeros_like(pinned["w_alpha"]), np.full_like(pinned["b_alpha"], 60.0)
    x = np.random.default_rng(2).standard_normal((2, 7, cfg.d_model))
    y, _, st = SM.forward(x, params, cfg)
    y_on, _, st_on = SM.forward(x, pinned, on)
    np.testing.assert_allclose(y, y_on, rtol=1e-13, atol=1e-14)
    for k in st:
        np.testing.assert_allclose(st[k], st_on[k], rtol=1e-13, atol=1e-14)
    assert np.abs(y - SM.forward(x, SM.init_params(on, np.random.default_rng(1)), on)[0]).max() > 1e-8
