"""Small helpers shared by the fast-port equivalence tests (tests/cpu/test_cpu_*.py and the tests
that compare a whole model's port with the reference, e.g. tests/reference/test_linear_families.py)."""

import numpy as np
from hypothesis import note as _note
from tolerances import assert_close, tol


def note(msg):
    """``hypothesis.note`` that is also callable outside a hypothesis test (then a no-op)."""
    try:
        _note(msg)
    except Exception:  # outside a hypothesis test
        pass


def readonly(tree):
    """A copy of ``tree`` (dicts of arrays, nested) whose arrays are read-only, so a function that
    writes into its inputs fails loudly; other values are returned as they are."""
    if isinstance(tree, dict):
        return {k: readonly(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        a = np.array(tree)
        a.flags.writeable = False
        return a
    return tree


def copy_tree(tree):
    """A shallow dict copy whose arrays are fresh copies (to check inputs were left unchanged)."""
    return {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in tree.items()}


def assert_state_close(a, b, dtype, name="state"):
    """Nested state trees (dicts, lists, tuples of arrays) within the ``(dtype, "port")`` row; other
    leaves equal."""
    if isinstance(a, np.ndarray):
        assert_close(a, b, dtype, "port", name)
    elif isinstance(a, dict):
        assert set(a) == set(b), name
        for k in a:
            assert_state_close(a[k], b[k], dtype, f"{name}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), name
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_close(x, y, dtype, f"{name}[{i}]")
    else:
        assert a == b, name


def assert_grads_close(gf, gr, dtype):
    """Every gradient within the port tolerance: per key in float64; in float32 on the scale of the
    whole gradient (a key whose exact gradient is 0, e.g. W_q when every query sees one key, is
    rounding noise ~1e-9 in both backends while the largest gradient is ~1: measured over 2 x 160
    configs drawn by ``strategies.model_configs``, worst per-key rel 0.9, worst on one scale 1.4e-5)."""
    whole = max(float(np.max(np.abs(g))) for g in gr.values() if g.size)
    for k in gr:
        assert gf[k].dtype == gr[k].dtype == np.dtype(dtype), k
        if dtype == "float64":
            assert_close(gf[k], gr[k], dtype, "port", k)
            continue
        assert gf[k].shape == gr[k].shape, k
        diff = float(np.max(np.abs(gf[k].astype(np.float64) - gr[k]))) if gr[k].size else 0.0
        assert diff <= tol(dtype, "port") * whole, f"{k}: max abs {diff:.3e} > {tol(dtype, 'port')} x {whole:.3e}"


def assert_model_port_matches(F, R, params, tokens, cfg, dtype, split):
    """A port's model API (``F``: fast.cpu.model, ...) against the reference's (``R``): the loss and
    every gradient, the logits and the returned state, the stream cut at ``split`` (the port's
    state carried on the port and on the reference), each within the ("port") rows."""
    lf, gf = F.loss_and_grads(params, tokens, cfg)
    lr, gr = R.loss_and_grads(params, tokens, cfg)
    assert isinstance(lf, float)
    assert_close(lf, lr, dtype, "port", "loss")
    assert list(gf) == list(gr)
    assert_grads_close(gf, gr, dtype)
    yf, sf = F.forward(params, tokens, cfg)
    yr, sr = R.forward(params, tokens, cfg)
    assert yf.dtype == np.dtype(dtype)
    assert_close(yf, yr, dtype, "port", "logits")
    assert_state_close(sf, sr, dtype)
    y1, s1 = F.forward(params, tokens[:, :split], cfg)
    y2, _ = F.forward(params, tokens[:, split:], cfg, s1)
    assert_close(np.concatenate([y1, y2], axis=1), yr, dtype, "port", "streamed logits")
    y2r, _ = R.forward(params, tokens[:, split:], cfg, s1)  # a port's state continues on the reference
    assert_close(y2r, yr[:, split:], dtype, "port", "port state on the reference")


def batch_innermost(a):
    """The same values with the batch axis innermost in memory: what NumPy's default order ("K")
    makes of a copy of a broadcast state (SPEC.md#fast-cpu "State layout")."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 0, -1)), -1, 0)


def assert_state_layout_is_irrelevant(forward, backward, params, cfg, state, x, dy, rng, c_ordered):
    """A memory layer's ``forward`` from ``state`` and from the same state laid out batch-innermost
    (its 4-D arrays) gives the same outputs, states and gradients (float64 ``port`` row), and the
    trees named in ``c_ordered`` ("state", "dstate0") come back C-ordered from the odd layout."""
    odd = {k: (batch_innermost(v) if isinstance(v, np.ndarray) and v.ndim == 4 else v) for k, v in state.items()}
    assert not any(v.flags.c_contiguous for v in odd.values() if isinstance(v, np.ndarray) and v.ndim == 4)
    dstate = {k: rng.standard_normal(v.shape) for k, v in state.items() if isinstance(v, np.ndarray)}
    outs = []
    for st_in in (state, odd):
        y, cache, new = forward(x, params, cfg, st_in)
        outs.append((y, new, backward(dy, cache, dict(dstate))))
    (y1, new1, (dx1, g1, d01)), (y2, new2, (dx2, g2, d02)) = outs
    assert_close(y2, y1, np.float64, "port", "y")
    assert_close(dx2, dx1, np.float64, "port", "dx")
    for tree1, tree2, name in ((new1, new2, "state"), (g1, g2, "grads"), (d01, d02, "dstate0")):
        for k in tree1:
            if isinstance(tree1[k], np.ndarray):
                assert_close(tree2[k], tree1[k], np.float64, "port", f"{name}[{k}]")
                if name in c_ordered and tree2[k].ndim >= 2:
                    assert tree2[k].flags.c_contiguous, f"{name}[{k}] {tree2[k].strides}"
