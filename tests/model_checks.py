"""Whole-model gradient-check helpers (not a test file), shared by tests/reference/test_model.py and
tests/reference/test_linear_families.py: the loss of the forward function itself and central differences at
a few random entries of every parameter."""

import numpy as np

from nlref.reference import model
from nlref.reference import primitives as P
from nlref.reference.gradcheck import rel_error


def plain_loss(params, tokens, cfg):
    """The loss of the forward function itself (in-context increments recomputed from params)."""
    logits, _ = model.forward(params, tokens, cfg)
    return P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])[0]


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
