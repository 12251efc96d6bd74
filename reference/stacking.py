"""Ad-hoc level stacking: a pre-trained model's MLPs become CMS levels (NL §7.3).

Paper: §7.3, arXiv 2512.24695v1: initialise the CMS blocks from a pre-trained model's MLPs,
``MLP^(f_i)_0 = MLP^pretrained_i``, then update them in context with Eq. (71); letting every
eta^(l) -> 0 recovers the frozen pre-trained model. SPEC: SPEC.md#cms "Ad-hoc level stacking".

Decisions (SPEC.md#cms):
- *The pre-trained MLPs* are the CMS chain of a model whose levels are frozen in context (a
  ``hope`` or ``hope-attention`` config with ``cms_in_context = false`` or every period None): in
  this project's terms an MLP block is a CMS level that never updates in context (§7), and its
  levels already have the CMS form ``z + W1 act(W2 z)``. A transformer's SwiGLU MLP has another
  form (gated, no residual inside the level), so it is refused rather than approximated.
- *Level i* of the stacked model is the pre-trained chain's i-th MLP, with the period and rate the
  caller gives (``None`` keeps it frozen); every other parameter is copied unchanged, so the two
  models have the same parameters and differ only in which levels learn in context.
- *The outer level* goes on as before: the stacked model trains (``nested-learning train
  --init-from``) from these weights; the paper's continual pre-training.
"""

from __future__ import annotations

import dataclasses

from .config import CMSLevel, ModelConfig
from .contract import has_cms, param_shapes


def stack(params: dict, cfg: ModelConfig, periods, etas) -> tuple[dict, ModelConfig]:
    """(parameters, config) of the stacked model: ``cfg``'s frozen CMS chain as levels updated in
    context every ``periods[i]`` tokens at rate ``etas[i]`` (``None`` period: frozen). The
    parameters are ``params`` themselves (a new dict of the same arrays). ValueError for a model
    without a frozen CMS chain or lists of the wrong length."""
    if not has_cms(cfg):
        raise ValueError(f"{cfg.name} ({cfg.family}) has no CMS chain to stack: stacking turns the frozen CMS "
                         "levels of a hope or hope-attention model into in-context levels (a transformer's "
                         "SwiGLU MLP has another form; SPEC.md#cms)")
    live = [i for i, lv in enumerate(cfg.cms_levels) if lv.period is not None] if cfg.cms_in_context else []
    if live:
        raise ValueError(f"{cfg.name}: levels {live} already learn in context; stacking starts from a model whose "
                         "MLPs are frozen (cms_in_context = false, or every period None)")
    periods, etas = list(periods), list(etas)
    n = len(cfg.cms_levels)
    if len(periods) != n or len(etas) != n:
        raise ValueError(f"{cfg.name} has {n} CMS level(s) per block: give {n} periods and {n} rates "
                         f"(got {len(periods)} and {len(etas)})")
    levels = tuple(CMSLevel(hidden=lv.hidden, period=p, eta=0.0 if p is None else float(e))
                   for lv, p, e in zip(cfg.cms_levels, periods, etas, strict=True))
    new = dataclasses.replace(cfg, name=f"{cfg.name}-stacked", cms_levels=levels, cms_in_context=True)
    if param_shapes(new) != param_shapes(cfg):  # the same parameters: only the in-context schedule moved
        raise AssertionError("stacking changed the parameter shapes")
    return dict(params), new
