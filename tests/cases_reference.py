"""Input builders of the reference's own property tests (not a test file), shared by those tests and
scripts/calibrate_tolerances.py, which measures on these same cases the errors the rows of
tests/tolerances.py bound: every primitive's calls (tests/reference/test_primitives.py, the
("float32", "primitive_vs_float64") row) and the MLP memory's inputs and outputs
(tests/reference/test_mlp_memory.py, the ("float32", "mlp_memory_vs_float64") row).
"""

import numpy as np

from nlref.reference import mlp_memory as mm
from nlref.reference import primitives as P

# ------------------------------------------------------------------------------------------------
# Primitives (tests/reference/test_primitives.py)
# ------------------------------------------------------------------------------------------------


def primitive_calls(rng, dtype):
    """name -> (inputs, forward(inputs) -> outputs list, backward(outputs, cache) -> grads list)."""
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    tok = rng.integers(0, 5, size=(2, 3))
    act = {n: (getattr(P, f"{n}_forward"), getattr(P, f"{n}_backward")) for n in P.ACTIVATIONS}
    cases = {
        "linear": ({"x": r(2, 3, 4), "W": r(5, 4), "b": r(5)}, P.linear_forward, P.linear_backward),
        "embedding": ({"tokens": tok, "E": r(5, 4)}, P.embedding_forward, P.embedding_backward),
        "rmsnorm": ({"x": r(2, 3, 4), "g": r(4)}, P.rmsnorm_forward, P.rmsnorm_backward),
        "layernorm": ({"x": r(2, 3, 4), "g": r(4), "b": r(4)}, P.layernorm_forward, P.layernorm_backward),
        "layernorm_plain": ({"x": r(2, 3, 4)}, P.layernorm_forward, P.layernorm_backward),
        "l2norm": ({"x": r(2, 3, 4)}, P.l2norm_forward, P.l2norm_backward),
        "swiglu": (
            {"x": r(2, 3, 4), "W_gate": r(6, 4), "W_up": r(6, 4), "W_down": r(4, 6)},
            P.swiglu_forward,
            P.swiglu_backward,
        ),
        "conv1d": (
            {"x": r(2, 3, 4), "w": r(4, 4), "b": r(4), "state": r(2, 3, 4)},
            P.conv1d_forward,
            P.conv1d_backward,
        ),
        "rope": ({"x": r(2, 3, 4), "positions": np.arange(3)}, P.rope_forward, P.rope_backward),
        "softmax": ({"x": r(2, 3, 4)}, P.softmax_forward, P.softmax_backward),
        "attention": (
            {"q": r(1, 2, 3, 4), "k": r(1, 2, 5, 4), "v": r(1, 2, 5, 3)},
            P.attention_forward,
            P.attention_backward,
        ),
        "cross_entropy": ({"logits": r(2, 3, 5), "targets": tok}, P.cross_entropy_forward, None),
    } | {n: ({"x": r(2, 3)}, f, b) for n, (f, b) in act.items()}
    return cases


def primitive_run(name, inputs, forward, backward, rng):
    """(outputs, non-None gradients) of one case of ``primitive_calls``, the upstream gradient from ``rng``."""
    out = forward(**inputs)
    y, cache = out[0], out[1]
    outputs = [y] + list(out[2:])
    if name == "cross_entropy":
        grads = [P.cross_entropy_backward(1.0, cache)]
    else:
        dy = rng.standard_normal(np.shape(y)).astype(np.asarray(y).dtype)
        grads = backward(dy, cache)
        grads = list(grads) if isinstance(grads, tuple) else [grads]
    return outputs, [g for g in grads if g is not None]


# ------------------------------------------------------------------------------------------------
# The MLP memory (tests/reference/test_mlp_memory.py; configs: strategies.mlp_memory_reference_configs)
# ------------------------------------------------------------------------------------------------


def mlp_reference_inputs(cfg, dtype=np.float64):
    """({W1, W2, k, v_hat} in ``dtype``, the rng after drawing them) of one drawn config."""
    rng = np.random.default_rng(cfg["seed"])
    lead, N, D, Hm = cfg["lead"], cfg["N"], cfg["D"], cfg["Hm"]
    x = {
        "W1": 0.7 * rng.standard_normal((*lead, D, Hm)),
        "W2": 0.7 * rng.standard_normal((*lead, Hm, D)),
        "k": rng.standard_normal((*lead, N, D)),
        "v_hat": rng.standard_normal((*lead, N, D)),
    }
    return {key: v.astype(dtype) for key, v in x.items()}, rng


def mlp_opts(cfg):
    return {"act": cfg["act"], "layernorm": cfg["layernorm"]}


def mlp_all_outputs(x, cfg, seed=0):
    """Every function's outputs, with random upstream gradients (all-ones is in LN's null space)."""
    rng = np.random.default_rng(seed)
    dt = x["k"].dtype

    def up(t):
        return rng.standard_normal(t.shape).astype(dt)

    opts = mlp_opts
    y, cache = mm.mlp_memory_forward(x["W1"], x["W2"], x["k"], **opts(cfg))
    out = {"y": y}
    out.update(zip(("dW1", "dW2", "dz"), mm.mlp_memory_backward(up(y), cache), strict=True))
    out["l"] = mm.inner_loss(**x, **opts(cfg))
    u1, a, u2, cache = mm.inner_grad(**x, **opts(cfg))
    out.update(u1=u1, a=a, u2=u2)
    bw = mm.inner_grad_backward(up(u1), up(a), up(u2), cache)
    out.update(zip(("bW1", "bW2", "bk", "bv"), bw, strict=True))
    out.update(zip(("G1", "G2"), mm.inner_grad_dense(**x, **opts(cfg)), strict=True))
    return out
