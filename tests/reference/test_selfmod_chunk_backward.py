"""Tests of reference/selfmod_chunk.py ``write_chunk_ut_backward``: the VJP of the UT (WY) chunk form of
self-modifying Titans' writes (SPEC.md#selfmod, "Chunk-parallel form (in progress)"; derivation
docs/selfmod-chunk.md §7).

Oracles: the complex step of ``write_chunk_ut`` itself (reference/gradcheck.py; exact to rounding),
and the token loop's backward ``selfmod_memory.write_tokens_backward`` (``write_backward`` reversed
token by token, the layer's oracle). Inputs as tests/reference/test_selfmod_chunk.py: l2-normalised
keys, eta' in (0, 0.5), alpha in (0.5, 1], beta in (0, 1).

Error measure (docs/selfmod-chunk.md §7.6): the UT form's rounding is relative to the scalar decay,
not to the matrix product of the factors. The chunk-start adjoints dP_0 = (A_1..A_n)^T dP (and dS_0)
are sums of terms of size D[n, 0] |dP| that cancel down to |(A_1..A_n)^T dP|, which is orders of
magnitude smaller when the shrinks contract faster than the retention (few key directions over a
long chunk: dh = 1, n = 49 put max|dP_0| at ~1e-9 D[n, 0] |dP| and the plain relative error at 1e-4
in float64, 1 in float32). So dPw and dS are compared relative to max(max|ref|, that scale); every
other gradient relative to its own maximum.
"""

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from strategies import DTYPES, SEEDS
from tolerances import tol

from nlref.reference import selfmod_chunk as SC
from nlref.reference import selfmod_memory as SMM
from nlref.reference.gradcheck import check_gradients
from nlref.reference.selfmod_config import SelfModConfig

NAMES = ("Pw", "S", "G", "k", "ep", "alpha", "beta")  # the inputs, in the order of the gradients


def _inputs(rng, B, H, n, a, dh, keyside, momentum):
    """write_chunk_ut's arguments in float64 (as test_selfmod_chunk.py's _inputs) and the upstream
    adjoints (dP, dS) of the new state and momentum."""
    b = dh if keyside else int(rng.integers(1, 7))  # the key-side weight's second axis is the key's
    Pw, S = rng.standard_normal((B, H, a, b)), rng.standard_normal((B, H, a, b))
    G = rng.standard_normal((B, H, n, a, b))
    k = rng.standard_normal((B, H, n, dh))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    ep = rng.uniform(0.0, 0.5, (B, H, n))
    ep[ep == 0] = 0.25
    alpha = 1.0 - rng.uniform(0.0, 0.5, (B, H, n))
    beta = rng.uniform(0.0, 1.0, H) if momentum else None
    dP, dS = rng.standard_normal((B, H, a, b)), rng.standard_normal((B, H, a, b))
    return (Pw, S, G, k, ep, alpha, beta, keyside), dP, dS


def _cast(args, dtype):
    return tuple(x.astype(dtype) if isinstance(x, np.ndarray) else x for x in args)


def _ut_grads(args, dP, dS):
    _, _, cache = SC.write_chunk_ut(*args)
    return dict(zip(NAMES, SC.write_chunk_ut_backward(dP, dS, cache), strict=True)), cache


def _token_grads(args, dP, dS):
    return dict(zip(NAMES, SMM.write_tokens_backward(dP, dS, SMM.write_tokens_cache(*args)), strict=True))


def _floors(cache, dP, dS):
    """The scale of the chunk-start adjoints' terms (module docstring): D[n, 0] |dP| for dPw,
    c_n |dP| + beta^n |dS| for dS."""
    n, beta = cache["inputs"][2].shape[2], cache["inputs"][6]
    sP = float(np.max(cache["D"][..., n, 0])) * float(np.max(np.abs(dP)))
    sS = float(np.max(cache["c"][..., n])) * float(np.max(np.abs(dP)))
    if beta is not None:
        sS += float(np.max(beta**n)) * float(np.max(np.abs(dS)))
    return {"Pw": sP, "S": sS}


def _err(x, ref, floor=0.0):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x - ref))) / max(float(np.max(np.abs(ref))), floor, 1e-300)


def _errors(got, ref, floors):
    """Per-input error of a gradient dict against the oracle's (None where both are None)."""
    out = {}
    for name in NAMES:
        assert (got[name] is None) == (ref[name] is None), name
        if ref[name] is not None:
            out[name] = _err(got[name], ref[name], floors.get(name, 0.0))
    return out


# ---------------------------------------------------------------------------------------------
# (a) every input's gradient against the complex step (and the dot-product test)
# ---------------------------------------------------------------------------------------------


def _loss(keyside, dP, dS, momentum):
    def loss(x):
        beta = x["beta"] if momentum else None
        P, S, _ = SC.write_chunk_ut(x["Pw"], x["S"], x["G"], x["k"], x["ep"], x["alpha"], beta, keyside)
        return np.sum(P * dP) + (np.sum(S * dS) if momentum else 0.0)

    return loss


def _complex_step_errors(args, dP, dS, seed):
    keyside, momentum = args[7], args[6] is not None
    grads, _ = _ut_grads(args, dP, dS)
    keys = [k for k in NAMES if grads[k] is not None]  # no momentum: S is ignored, no beta
    inputs = {name: val for name, val in zip(NAMES, args[:7], strict=True) if name in keys}
    if not momentum:
        inputs["S"] = args[1]  # passed but ignored: its gradient is None
    return check_gradients(_loss(keyside, dP, dS, momentum), inputs, {k: grads[k] for k in keys},
                           np.random.default_rng(seed), method="complex", keys=keys)  # fmt: skip


@given(
    n=st.integers(1, 6),
    a=st.integers(1, 3),
    dh=st.integers(1, 3),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    keyside=st.booleans(),
    momentum=st.booleans(),
    seed=SEEDS,
)
def test_every_gradient_matches_the_complex_step(n, a, dh, B, H, keyside, momentum, seed):
    args, dP, dS = _inputs(np.random.default_rng(seed), B, H, n, a, dh, keyside, momentum)
    errs = _complex_step_errors(args, dP, dS, seed)
    note(str(errs))
    dot = errs.pop("<dot>")
    assert all(e <= tol("float64", "complex_step") for e in errs.values()), errs
    assert dot <= tol("float64", "gradcheck"), dot


@pytest.mark.parametrize("keyside", [True, False])
def test_edge_inputs_have_exact_gradients(keyside):
    """No condition on the inputs (docs/selfmod-chunk.md §7.6: det(I + L) = 1): alpha = 0 and
    eta' = 0 at some tokens, beta = 0 and 1, keys far from unit norm, all checked by the complex step."""
    rng = np.random.default_rng(11)
    args, dP, dS = _inputs(rng, 1, 3, 6, 3, 3, keyside, True)
    Pw, S, G, k, ep, alpha, beta, _ = args
    alpha[0, 0, 2] = 0.0  # the memory is wiped at token 3 of head 0
    ep[0, 1, [0, 4]] = 0.0  # no write at tokens 1, 5 of head 1
    k = 3.0 * k  # |k| = 3: eta'|k|^2 up to 4.5, the factors far from contractions
    beta = np.array([0.0, 1.0, 0.5])
    errs = _complex_step_errors((Pw, S, G, k, ep, alpha, beta, keyside), dP, dS, 11)
    dot = errs.pop("<dot>")
    assert all(e <= tol("float64", "complex_step") for e in errs.values()), errs
    assert dot <= tol("float64", "gradcheck"), dot


# ---------------------------------------------------------------------------------------------
# (b) equality with the token loop's backward, chunk sizes 1-64, float64 and float32
# ---------------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 64),
    a=st.integers(1, 6),
    dh=st.integers(1, 6),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    keyside=st.booleans(),
    momentum=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_equals_the_token_loop_backward(n, a, dh, B, H, keyside, momentum, dtype, seed):
    """float64: within the ("float64", "rewrite") row. float32: the UT form in float32 is within
    ("float32", "rewrite") of the float64 token loop, or within ("float32", "port_vs_own_rounding")
    times the float32 token loop's own error there (a cancelling sum, e.g. dbeta, rounds in both)."""
    args64, dP, dS = _inputs(np.random.default_rng(seed), B, H, n, a, dh, keyside, momentum)
    ref, cache = _token_grads(args64, dP, dS), SC.write_chunk_ut(*args64)[2]
    floors = _floors(cache, dP, dS)
    if dtype == "float64":
        errs = _errors(_ut_grads(args64, dP, dS)[0], ref, floors)
        note(str(errs))
        assert all(e <= tol("float64", "rewrite") for e in errs.values()), errs
        return
    args32, dP32, dS32 = _cast(args64, np.float32), dP.astype(np.float32), dS.astype(np.float32)
    got = _ut_grads(args32, dP32, dS32)[0]
    assert all(g.dtype == np.float32 for g in got.values() if g is not None)
    errs = _errors(got, ref, floors)
    own = _errors(_token_grads(args32, dP32, dS32), ref, floors)
    note(f"UT float32: {errs}; token loop float32: {own}")
    factor = tol("float32", "port_vs_own_rounding")
    bad = {k: (e, own[k]) for k, e in errs.items() if e > max(tol("float32", "rewrite"), factor * own[k])}
    assert not bad, bad


def test_a_single_token_is_write_backward():
    """n = 1: the UT backward is the token's own VJP (write_backward), to rounding."""
    args, dP, dS = _inputs(np.random.default_rng(2), 2, 2, 1, 4, 3, True, True)
    got = _ut_grads(args, dP, dS)[0]
    Pw, S, G, k, ep, alpha, beta, ks = args
    one = SMM.write_backward(dP, dS, (Pw, S, G[:, :, 0], k[:, :, 0], ep[:, :, 0], alpha[:, :, 0], beta, ks))
    for name, ref in zip(NAMES, one, strict=True):
        ref = ref if name in ("Pw", "S", "beta") else ref[:, :, None]
        assert _err(got[name], ref) <= 1e-14, name


# ---------------------------------------------------------------------------------------------
# (c) the tests can tell a dropped term
# ---------------------------------------------------------------------------------------------


def _one_sided_gram(dKK, k):
    return np.einsum("bhti,bhik->bhtk", dKK, k)  # k_t . k_i differentiated in k_t only


PLANTED = {
    # the adjoint solve without its coupling: dr = dw, the reads' dependence on earlier writes dropped
    "solve coupling": ("_solve_unit_upper_transposed", lambda L, R: R),
    # the Gram k_t . k_i differentiated in one of its two keys only
    "Gram's second key": ("_gram_backward", _one_sided_gram),
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_a_dropped_write_term_is_caught(planted, monkeypatch):
    """Each term of the key side's VJP matters: dropping it is far outside the rewrite row."""
    args, dP, dS = _inputs(np.random.default_rng(3), 2, 2, 8, 4, 5, True, True)
    ref = _token_grads(args, dP, dS)
    floors = _floors(SC.write_chunk_ut(*args)[2], dP, dS)
    assert max(_errors(_ut_grads(args, dP, dS)[0], ref, floors).values()) <= tol("float64", "rewrite")
    monkeypatch.setattr(SC, *PLANTED[planted])
    errs = _errors(_ut_grads(args, dP, dS)[0], ref, floors)
    assert max(errs.values()) > 1e-3, errs


def _memory_chunk(cfg, dP, dS):
    """A loss through one memory's chunk as the layer runs it (selfmod._memory_backward): the MLP
    memory's inner gradients at the chunk-start state st (Eq. 93), both weights written from st by
    the UT form (W2 on the key side, W1 plain), <P_n, dP> + <S_n, dS> over the two weights."""

    def loss(x):
        st = {"W1": x["W1"], "W2": x["W2"]}
        G, _ = SMM.inner_grad(cfg, st, x["k"], x["vhat"])
        total = 0.0
        for w in ("W2", "W1"):
            P, S, _ = SC.write_chunk_ut(st[w], x[f"S_{w}"], G[w], x["k"], x["ep"], x["alpha"], x["beta"],
                                        SMM.keyside(w))  # fmt: skip
            total = total + np.sum(P * dP[w]) + np.sum(S * dS[w])
        return total

    return loss


def _memory_chunk_grads(cfg, x, dP, dS, second_order):
    """The hand-written gradient of ``_memory_chunk``: each weight's UT backward, then (second_order)
    the inner gradients' VJP (selfmod_memory.inner_grad_backward, through sigma'') into st, k, vhat."""
    st = {"W1": x["W1"], "W2": x["W2"]}
    G, c_grad = SMM.inner_grad(cfg, st, x["k"], x["vhat"])
    g = {key: np.zeros_like(val) for key, val in x.items()}
    dG = {}
    for w in ("W2", "W1"):
        _, _, cache = SC.write_chunk_ut(st[w], x[f"S_{w}"], G[w], x["k"], x["ep"], x["alpha"], x["beta"],
                                        SMM.keyside(w))  # fmt: skip
        dPw, dSw, dG[w], dk, dep, dalpha, dbeta = SC.write_chunk_ut_backward(dP[w], dS[w], cache)
        for key, val in (
            (w, dPw),
            (f"S_{w}", dSw),
            ("k", dk),
            ("ep", dep),
            ("alpha", dalpha),
            ("beta", dbeta),
        ):
            g[key] += val
    if second_order:
        dst, dk_g, dvhat = SMM.inner_grad_backward(cfg, dG, c_grad)
        g["W1"] += dst["W1"]
        g["W2"] += dst["W2"]
        g["k"] += dk_g
        g["vhat"] += dvhat
    return g


def test_second_order_terms_through_the_inner_gradients():
    """The outer gradient goes through the writes and through the inner gradients they write: with
    inner_grad_backward (second order, sigma'') the composed gradient matches the complex step in
    every input; without it (G treated as a constant) the chunk-start state's, k's and the targets'
    gradients are far off, so the check can tell."""
    rng = np.random.default_rng(4)
    B, H, n, dh, Hm = 2, 2, 6, 3, 4
    cfg = SelfModConfig(d_model=H * dh, n_heads=H, memory="mlp", hidden=Hm, act="silu")
    k = rng.standard_normal((B, H, n, dh))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = {
        "W1": 0.5 * rng.standard_normal((B, H, dh, Hm)),
        "W2": 0.5 * rng.standard_normal((B, H, Hm, dh)),
        "S_W1": rng.standard_normal((B, H, dh, Hm)),
        "S_W2": rng.standard_normal((B, H, Hm, dh)),
        "k": k,
        "vhat": rng.standard_normal((B, H, n, dh)),
        "ep": rng.uniform(0.05, 0.5, (B, H, n)),
        "alpha": rng.uniform(0.5, 1.0, (B, H, n)),
        "beta": rng.uniform(0.2, 0.9, H),
    }
    dP = {w: rng.standard_normal(x[w].shape) for w in ("W1", "W2")}
    dS = {w: rng.standard_normal(x[w].shape) for w in ("W1", "W2")}
    loss = _memory_chunk(cfg, dP, dS)
    full = _memory_chunk_grads(cfg, x, dP, dS, second_order=True)
    errs = check_gradients(loss, x, full, np.random.default_rng(5), method="complex")
    dot = errs.pop("<dot>")
    assert all(e <= tol("float64", "complex_step") for e in errs.values()), errs
    assert dot <= tol("float64", "gradcheck"), dot
    first = _memory_chunk_grads(cfg, x, dP, dS, second_order=False)
    errs1 = check_gradients(
        loss, x, first, np.random.default_rng(5), method="complex", keys=["W1", "W2", "k", "vhat"]
    )
    assert all(errs1[key] > 1e-2 for key in ("W1", "W2", "k", "vhat")), errs1


def test_bad_adjoint_shapes_raise_value_error():
    args, dP, dS = _inputs(np.random.default_rng(6), 1, 2, 4, 3, 3, True, True)
    _, _, cache = SC.write_chunk_ut(*args)
    with pytest.raises(ValueError, match="dP_new"):
        SC.write_chunk_ut_backward(dP[..., :-1], dS, cache)
    with pytest.raises(ValueError, match="dS_new"):
        SC.write_chunk_ut_backward(dP, dS[:, :1], cache)
    got = SC.write_chunk_ut_backward(dP, None, cache)  # None: a zero adjoint of the momentum
    ref = SC.write_chunk_ut_backward(dP, np.zeros_like(dS), cache)
    assert all(np.array_equal(g, r) for g, r in zip(got, ref, strict=True))
