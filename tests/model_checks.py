"""Whole-model check helpers (not a test file), shared by tests/reference/test_model.py,
test_linear_families.py and test_titans_hybrids.py: the loss of the forward function itself,
central differences at a few random entries of every parameter, and the forward chained over
split points (the streaming checks)."""

import numpy as np

from nlref.reference import model
from nlref.reference import primitives as P
from nlref.reference.gradcheck import rel_error


def plain_loss(params, tokens, cfg):
    """The loss of the forward function itself (in-context increments recomputed from params)."""
    logits, _ = model.forward(params, tokens, cfg)
    return P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])[0]


def chained_forward(params, tokens, cfg, cuts):
    """One forward over ``tokens`` and the same tokens as chained calls cut at ``cuts`` (each call
    the previous one's state): (logits, state, chained logits concatenated, the state after each
    call as (end position, state) pairs; the last is the chain's final state)."""
    T = tokens.shape[1]
    logits, state = model.forward(params, tokens, cfg)
    pieces, states, st_ = [], [], None
    for a, b in zip([0] + sorted(cuts), sorted(cuts) + [T], strict=True):
        lg, st_ = model.forward(params, tokens[:, a:b], cfg, st_)
        pieces.append(lg)
        states.append((b, st_))
    return logits, state, np.concatenate(pieces, axis=1), states


def spot_check(f, params, grads, rng, n_spots=1, eps=1e-6):
    """Central differences at ``n_spots`` random entries of every key. Returns (rel error over
    all the sampled entries, as check_gradients measures a vector, and the worst key). Per-key
    scales are not used: some keys' gradients are ~1e-8, below central differences' rounding
    floor (~3e-10 absolute at loss ~3 and e = 1e-6)."""
    num, ana, names = [], [], []
    for key, p in params.items():
        for i in rng.choice(p.size, size=min(n_spots, p.size), replace=False):
            vals = []
            for sign in (1, -1):
                q = p.copy()
                q.flat[i] += sign * eps
                vals.append(float(f(params | {key: q})))
            num.append((vals[0] - vals[1]) / (2 * eps))
            ana.append(float(grads[key].flat[i]))
            names.append(key)
    num, ana = np.array(num), np.array(ana)
    return rel_error(ana, num), names[int(np.argmax(np.abs(num - ana)))]


def check_model_gradients(f, loss, params, grads, rng, n_dot: int = 3) -> None:
    """The whole-model gradient check every family's test runs: ``f(params)`` (the loss the
    gradients are of) reproduces ``loss``, ``n_dot`` random-direction central-difference dot-product
    tests and a spot check of single entries, all within the ("float64", "gradcheck") row."""
    from tolerances import tol

    from nlref.reference.gradcheck import dot_product_test

    assert abs(loss - float(f(params))) <= 1e-12 * max(1.0, abs(loss))
    t = tol("float64", "gradcheck")
    for _ in range(n_dot):
        assert dot_product_test(f, params, grads, rng) <= t
    error, worst = spot_check(f, params, grads, rng)
    assert error <= t, (worst, error)
