"""Tests of reference/selfmod_chunk.py: the UT (WY) chunk form of self-modifying Titans' writes
(SPEC.md#selfmod, "Chunk-parallel form (in progress)"; derivation docs/selfmod-chunk.md).

Oracles: ``selfmod_memory.write_tokens`` (the token loop of ``write``) and ``write_chunk`` (the
suffix-product closed form). Keys are l2-normalised as in the layer (the factors
alpha I - eta' k k^T then have eigenvalues in (0, 1]).
"""

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from tolerances import assert_close

from nlref.reference import memory as MEM
from nlref.reference import selfmod_chunk as SC
from nlref.reference import selfmod_memory as SMM

# The brief's bound for two exact rewrites in float64 (observed ~1e-15; tighter than the
# ("float64", "rewrite") row's 1e-10, which covers whole layers).
TOL64 = 1e-12


def _inputs(rng, B, H, n, a, dh, keyside, momentum, dtype=np.float64):
    b = dh if keyside else int(rng.integers(1, 7))  # the key-side weight's second axis is the key's
    Pw = rng.standard_normal((B, H, a, b))
    S = rng.standard_normal((B, H, a, b))
    G = rng.standard_normal((B, H, n, a, b))
    k = rng.standard_normal((B, H, n, dh))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    ep = rng.uniform(0.0, 0.5, (B, H, n))
    ep[ep == 0] = 0.25  # eta' in (0, 0.5)
    alpha = 1.0 - rng.uniform(0.0, 0.5, (B, H, n))  # alpha in (0.5, 1]
    beta = rng.uniform(0.0, 1.0, H) if momentum else None
    cast = [x.astype(dtype) for x in (Pw, S, G, k, ep, alpha)]
    return (*cast, None if beta is None else beta.astype(dtype), keyside)


def _rel(x, y):
    scale = max(float(np.max(np.abs(x))), float(np.max(np.abs(y))), 1e-300)
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) / scale


def _token_states(cache):
    """P_1 .. P_n from ``write_tokens``'s cache (each token's cache starts with the state before it)."""
    return np.stack([c[0] for c in cache[1:]], axis=2)


@given(
    n=st.integers(1, 16),
    a=st.integers(1, 6),
    dh=st.integers(1, 6),
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    keyside=st.booleans(),
    momentum=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_ut_form_equals_token_loop_and_closed_form(n, a, dh, B, H, keyside, momentum, seed):
    args = _inputs(np.random.default_rng(seed), B, H, n, a, dh, keyside, momentum)
    P_ut, S_ut, cache = SC.write_chunk_ut(*args)
    P_tok, S_tok, c_tok = SMM.write_tokens(*args)
    P_cf, S_cf, _ = SMM.write_chunk(*args)
    errs = {
        "P vs write_tokens": _rel(P_ut, P_tok),
        "S vs write_tokens": _rel(S_ut, S_tok),
        "P vs write_chunk": _rel(P_ut, P_cf),
        "S vs write_chunk": _rel(S_ut, S_cf),
    }
    states = SC.token_states_ut(cache)
    if n > 1:
        errs["P_t vs write_tokens"] = _rel(states[:, :, :-1], _token_states(c_tok))
    errs["P_n from the states"] = _rel(states[:, :, -1], P_ut)
    note(str(errs))
    assert P_ut.shape == P_tok.shape and S_ut.shape == S_tok.shape
    assert all(e <= TOL64 for e in errs.values()), errs


@pytest.mark.parametrize("keyside", [True, False])
@pytest.mark.parametrize("momentum", [True, False])
def test_float32_within_the_port_row(keyside, momentum):
    rng = np.random.default_rng(7)
    args32 = _inputs(rng, 2, 2, 16, 5, 6, keyside, momentum, dtype=np.float32)
    P, S, cache = SC.write_chunk_ut(*args32)
    assert P.dtype == S.dtype == np.float32
    assert all(cache[x].dtype == np.float32 for x in ("D", "E", "c"))
    P_tok, S_tok, _ = SMM.write_tokens(*args32)
    assert_close(P, P_tok, np.float32, "port", "P_n vs float32 write_tokens")
    assert_close(S, S_tok, np.float32, "port", "S_n vs float32 write_tokens")
    args64 = tuple(x.astype(np.float64) if isinstance(x, np.ndarray) else x for x in args32)
    P64, S64, _ = SMM.write_tokens(*args64)
    assert_close(P, P64, np.float32, "port", "P_n vs float64 write_tokens")
    assert_close(S, S64, np.float32, "port", "S_n vs float64 write_tokens")


def test_planted_errors_are_caught(monkeypatch):
    """Dropping the k k^T shrink, or the UT system's coupling (the solve returning its right side),
    is far outside TOL64."""
    args = _inputs(np.random.default_rng(3), 2, 2, 8, 4, 5, True, True)
    P_tok, _, _ = SMM.write_tokens(*args)
    P_plain, _, _ = SC.write_chunk_ut(*args[:-1], False)  # the k k^T term dropped
    assert _rel(P_plain, P_tok) > 1e-3
    monkeypatch.setattr(SC, "_solve_unit_lower", lambda L, r: r)  # (I + L) w = r without L
    P_bad, _, _ = SC.write_chunk_ut(*args)
    assert _rel(P_bad, P_tok) > 1e-3


def test_no_momentum_delta_direction_is_memory_py_gated_delta_rule():
    """Without momentum and with G_t = -v_t k_t^T (the single-shrink direction) the key-side write is
    the gated delta rule with step eta': memory.delta_chunked_forward's UT form gives the same state."""
    rng = np.random.default_rng(5)
    B, T, d, dv = 2, 6, 4, 3
    k = rng.standard_normal((B, T, d))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q, v = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, dv))
    eta, alpha = rng.uniform(0.01, 0.5, (B, T)), rng.uniform(0.5, 1.0, (B, T))
    M0 = rng.standard_normal((B, dv, d))
    _, M_T, _ = MEM.delta_chunked_forward(q, k, v, eta, alpha, M0, T)
    G = -np.einsum("btv,btk->btvk", v, k)[:, None]  # (B, 1, T, dv, d)
    P, _, _ = SC.write_chunk_ut(M0[:, None], None, G, k[:, None], eta[:, None], alpha[:, None], None, True)
    assert _rel(P[:, 0], M_T) <= TOL64
