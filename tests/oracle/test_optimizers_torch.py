"""reference/optimizers.py against an independent implementation: torch.optim (SPEC.md#optimizers).

torch is the optional ``oracle`` extra (``pip install 'nested-learning-reference[oracle]'``, torch==2.13.0);
without it this module skips with that reason, and ``.ci/run`` installs the extra so CI runs it.

Each side runs its own 50-step trajectory in float64 from the same start and computes its own
gradients at its own iterate (NumPy analytically for the quadratic; torch autograd for the MLP,
on both sides: there torch only supplies gradients, the update under test is ours). The
trajectories must agree within ``tol("float64", "torch_oracle")`` at every step.

torch.optim.Muon runs Newton-Schulz in bfloat16 by design, so the float64 comparison swaps in a
float64 Newton-Schulz with torch's exact coefficients and operation order (everything else, the
momentum, Nesterov, the lr adjustment and weight decay, is torch's own code); a second test runs
the unmodified bfloat16 Muon with the bfloat16 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import assert_close

torch = pytest.importorskip(
    "torch", reason="torch is the optional 'oracle' extra: pip install 'nested-learning-reference[oracle]' (torch==2.13.0)"
)

from nlref.reference import optimizers  # noqa: E402

STEPS = 50


# ---------------------------------------------------------------------------------------------
# Problems: a coupled random quadratic and a small tanh MLP with an MSE loss.
# ---------------------------------------------------------------------------------------------


def quadratic(seed):
    rng = np.random.default_rng(seed)
    shapes = {"W": (4, 3), "b": (4,)}
    n = 16
    Q = rng.standard_normal((n, n))
    A = Q @ Q.T / n + 0.1 * np.eye(n)  # SPD, couples every entry
    c = rng.standard_normal(n)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}

    def np_grad(p):
        x = np.concatenate([p["W"].ravel(), p["b"]])
        g = A @ x - c  # gradient of 1/2 x^T A x - c^T x
        return {"W": g[:12].reshape(4, 3), "b": g[12:]}

    At, ct = torch.from_numpy(A), torch.from_numpy(c)

    def torch_loss(tp):
        x = torch.cat([tp["W"].reshape(-1), tp["b"]])
        return 0.5 * x @ At @ x - ct @ x

    return params, np_grad, torch_loss


def mlp(seed):
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.standard_normal((16, 5)))
    Y = torch.from_numpy(rng.standard_normal((16, 2)))
    params = {"W1": rng.standard_normal((8, 5)) / np.sqrt(5), "b1": np.zeros(8),
              "W2": rng.standard_normal((2, 8)) / np.sqrt(8), "b2": np.zeros(2)}

    def torch_loss(tp):
        h = torch.tanh(X @ tp["W1"].T + tp["b1"])
        return ((h @ tp["W2"].T + tp["b2"] - Y) ** 2).mean()

    def np_grad(p):  # torch only differentiates the loss here; the update is ours
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
        torch_loss(tp).backward()
        return {k: tp[k].grad.numpy().copy() for k in p}

    return params, np_grad, torch_loss


PROBLEMS = {"quadratic": quadratic, "mlp": mlp}


def trajectories(problem, seed, ours, make_torch_opts, steps=STEPS):
    """Run both sides; return the two lists of parameter dicts (step 0 .. steps)."""
    params, np_grad, torch_loss = PROBLEMS[problem](seed)
    state = ours.init(params)
    p, mine = params, [params]
    for _ in range(steps):
        p, state = ours.update(p, np_grad(p), state)
        mine.append(p)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opts = make_torch_opts(tp)
    theirs = [{k: v.detach().numpy().copy() for k, v in tp.items()}]
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad()
        torch_loss(tp).backward()
        for opt in opts:
            opt.step()
        theirs.append({k: v.detach().numpy().copy() for k, v in tp.items()})
    return mine, theirs


def assert_trajectories_close(mine, theirs, kind="torch_oracle"):
    for t, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        for k in a:
            assert_close(a[k], b[k], "float64", kind, name=f"step {t} param {k}")
    # the runs moved: a comparison of two standing-still trajectories would prove nothing
    assert max(np.max(np.abs(mine[-1][k] - mine[0][k])) for k in mine[0]) > 1e-2


CASES = {
    "sgd": (("sgd", {"lr": 0.05, "weight_decay": 0.01}),
            lambda tp: [torch.optim.SGD(tp.values(), lr=0.05, weight_decay=0.01)]),
    "sgd_momentum": (("sgd", {"lr": 0.02, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
                     lambda tp: [torch.optim.SGD(tp.values(), lr=0.02, momentum=0.9, dampening=0.1,
                                                 weight_decay=0.01)]),
    "sgd_nesterov": (("sgd", {"lr": 0.02, "momentum": 0.8, "nesterov": True}),
                     lambda tp: [torch.optim.SGD(tp.values(), lr=0.02, momentum=0.8, nesterov=True)]),
    "momentum": (("momentum", {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01}),
                 lambda tp: [torch.optim.SGD(tp.values(), lr=0.02, momentum=0.9, weight_decay=0.01)]),
    "momentum_nesterov": (("momentum", {"lr": 0.02, "momentum": 0.8, "nesterov": True}),
                          lambda tp: [torch.optim.SGD(tp.values(), lr=0.02, momentum=0.8, nesterov=True)]),
    "adagrad": (("adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1}),
                lambda tp: [torch.optim.Adagrad(tp.values(), lr=0.1, lr_decay=0.01, weight_decay=0.01,
                                                initial_accumulator_value=0.1)]),
    "adam": (("adam", {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}),
             lambda tp: [torch.optim.Adam(tp.values(), lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)]),
    "adamw": (("adamw", {"lr": 0.02, "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 0.05}),
              lambda tp: [torch.optim.AdamW(tp.values(), lr=0.02, betas=(0.8, 0.999), eps=1e-8, weight_decay=0.05)]),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optim(problem, case):
    (name, hp), torch_opts = CASES[case]
    mine, theirs = trajectories(problem, 7, optimizers.make(name, **hp), torch_opts)
    assert_trajectories_close(mine, theirs)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_sgd_momentum_under_a_schedule_is_torchs(problem):
    """The training loop makes the optimizer anew at each step's lr (training.make_optimizer): sgd's
    buffer is in gradient units, so a changing lr multiplies it as torch.optim.SGD does."""
    lrs = [0.05, 0.03, 0.02, 0.04, 0.01, 0.02, 0.005]
    params, np_grad, torch_loss = PROBLEMS[problem](3)
    hp = {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}
    state = optimizers.make("sgd", lr=lrs[0], **hp).init(params)
    p, mine = params, [params]
    for lr in lrs:
        p, state = optimizers.make("sgd", lr=lr, **hp).update(p, np_grad(p), state)
        mine.append(p)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.SGD(tp.values(), lr=lrs[0], **hp)
    theirs = [{k: v.detach().numpy().copy() for k, v in tp.items()}]
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        torch_loss(tp).backward()
        opt.step()
        theirs.append({k: v.detach().numpy().copy() for k, v in tp.items()})
    assert_trajectories_close(mine, theirs)


# ---------------------------------------------------------------------------------------------
# Muon: torch.optim.Muon's conventions (EMA momentum, Nesterov, lr adjustment, weight decay).
# ---------------------------------------------------------------------------------------------


def _newton_schulz_float64(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz without the bfloat16 cast."""
    a, b, c = ns_coefficients
    X = grad.T if grad.size(0) > grad.size(1) else grad
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if grad.size(0) > grad.size(1) else X


def _muon_case(nesterov, adjust, wd, lr=0.02, adamw_lr=0.01):
    ours = optimizers.make("muon", lr=lr, momentum=0.9, nesterov=nesterov, ema=True, weight_decay=wd,
                           adjust_lr_fn=adjust or "original", adamw_lr=adamw_lr, adamw_betas=(0.9, 0.999),
                           adamw_eps=1e-8)

    def torch_opts(tp):
        mats = [v for v in tp.values() if v.ndim == 2]
        rest = [v for v in tp.values() if v.ndim != 2]
        opts = [torch.optim.Muon(mats, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=wd, adjust_lr_fn=adjust)]
        if rest:  # the usual convention, documented: non-matrix parameters go to AdamW
            opts.append(torch.optim.AdamW(rest, lr=adamw_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd))
        return opts

    return ours, torch_opts


MUON_CASES = {
    "torch_defaults": (True, None, 0.1),
    "no_nesterov": (False, None, 0.0),
    "match_rms_adamw": (True, "match_rms_adamw", 0.05),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("case", sorted(MUON_CASES))
def test_muon_matches_torch_muon_float64(problem, case, monkeypatch):
    import torch.optim._muon as torch_muon

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _newton_schulz_float64)
    ours, torch_opts = _muon_case(*MUON_CASES[case])
    mine, theirs = trajectories(problem, 11, ours, torch_opts)
    assert_trajectories_close(mine, theirs)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_muon_matches_unmodified_bfloat16_torch_muon(problem):
    ours, torch_opts = _muon_case(True, None, 0.1)
    mine, theirs = trajectories(problem, 11, ours, torch_opts)
    assert_trajectories_close(mine, theirs, kind="torch_muon_bfloat16")


def test_muon_paper_form_differs_from_torch_convention():
    """The default (Eq. 42: summed momentum, no lr adjustment) is not torch's convention: the
    options matter, so the tests above are not vacuous."""
    params, np_grad, _ = quadratic(3)
    params = {"W": params["W"]}
    paper = optimizers.make("muon", lr=0.02, momentum=0.9)
    torch_like, _ = _muon_case(True, None, 0.1)
    sa, sb, pa, pb = paper.init(params), torch_like.init(params), params, params
    for _ in range(3):
        pa, sa = paper.update(pa, {"W": np_grad({**pa, "b": np.zeros(4)})["W"]}, sa)
        pb, sb = torch_like.update(pb, {"W": np_grad({**pb, "b": np.zeros(4)})["W"]}, sb)
    assert np.max(np.abs(pa["W"] - pb["W"])) > 1e-3
