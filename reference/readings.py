"""The pinned readings that differ from the paper's letter, visible at run time (SPEC.md#readings).

SPEC.md decides every point the paper leaves open or prints inconsistently. Most decisions fill a
gap (the paper gives no squashing, no chunk size); the ones listed here are different: the paper
prints something, and this project computes something else, for the reason SPEC.md gives. A user
comparing their implementation with this one needs to see those at once, so ``nested-learning
info --model NAME`` and ``nested-learning levels`` print one line per reading that applies to the
model (and the optimizer), each with its SPEC.md anchor.

Each reading applies only to the configurations it describes: switching a model back to the
paper's letter (e.g. ``mem_normalize_v = false``) removes the line, and a switch that moves away
from the letter (e.g. ``mem_layernorm = true``) adds one.

- ``model_readings(cfg)``: the readings of a ``ModelConfig``, in a fixed order;
- ``optimizer_readings(name, hparams)``: those of an outer optimizer with its hyperparameters
  (the registry's defaults where ``hparams`` leaves a key out);
- ``lines(readings)``: the text lines the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    """One reading: ``key`` a stable id, ``ours`` what is computed, ``paper`` what the paper prints,
    ``anchor`` the SPEC.md section that gives the reason (``SPEC.md#<anchor>``)."""

    key: str
    ours: str
    paper: str
    anchor: str

    def line(self) -> str:
        return f"{self.key}: {self.ours}; the paper: {self.paper} [SPEC.md#{self.anchor}]"


def _selfmod(cfg) -> list[Reading]:
    out = [Reading(
        "dgd-step-size",
        "DGD's shrink and gradient terms both use eta' = eta / (1 + eta ||k||^2), the exact proximal step",
        "eta / (1 + eta) for unit keys (Eq. 57); the Appendix C derivation is garbled", "selfmod")]
    if cfg.mem_normalize_v:
        out.append(Reading("normalize-v", "v is l2-normalised like q and k (mem_normalize_v = true)",
                           "only q and k are normalised (NL §8); unnormalised v diverges, measured",
                           "selfmod"))
    if cfg.mem_momentum:
        out.append(Reading("selfmod-momentum",
                           "a Titans-style momentum S <- beta S - eta' G with a static per-head beta "
                           "(mem_momentum = true)",
                           "Eqs. 83-93 show no momentum; Table 6 ablates one", "selfmod"))
    if cfg.mem_adaptive_q:
        out.append(Reading("adaptive-q", "q comes from a memory M_q (mem_adaptive_q = true)",
                           "the text under Eq. 85 calls q the only non-adaptive projection "
                           "(Table 6 lists M_q)", "selfmod"))
    if cfg.mem_single_shrink:
        out.append(Reading("single-shrink", "the normalised delta rule onto v_hat: one k k^T shrink "
                           "(mem_single_shrink = true)",
                           "Eq. 88 as printed shrinks twice (DGD's term and the l2 gradient's)", "selfmod"))
    if cfg.mem_layernorm:
        out.append(Reading("memory-layernorm", "every memory is z + LN(W1 s(W2 z)) (mem_layernorm = true)",
                           "z + W1 s(W2 z) (Eqs. 89, 91)", "selfmod"))
    if cfg.mem_step_norm:
        out.append(Reading("step-norm", "each inner gradient times 1 / (1 + eta C lambda), lambda a bound of "
                           "its curvature (mem_step_norm = true)", "the step eta' G_t (Eq. 88)",
                           "hope-stability"))
    if cfg.mem_stop_grad_writes:
        out.append(Reading("stop-grad-writes", "the outer gradient stops at the memory writes "
                           "(mem_stop_grad_writes = true, first order)",
                           "no statement; the exact gradient through the writes is this project's "
                           "definition", "outer-gradient"))
    return out


def _cms(cfg) -> list[Reading]:
    if not cfg.cms_in_context or all(lv.period is None for lv in cfg.cms_levels):
        return []
    return [Reading("cms-chunk-sum", "a level's write sums the C^(l) losses of its own chunk, t = i - C + 1 .. i",
                    "Eq. 71's range t = i - C .. i has C + 1 terms (an off-by-one)", "cms")]


def _titans(cfg) -> list[Reading]:
    if cfg.mem_kind != "mlp" or cfg.mem_layernorm:
        return []
    return [Reading("titans-memory-no-layernorm", "the MLP memory is z + W1 s(W2 z), no LayerNorm "
                    "(mem_layernorm = false; the tiny presets)", "z + LN(W1 s(W2 z)) (Titans §3.3)", "titans-stability")]


def model_readings(cfg) -> list[Reading]:
    """The readings that apply to ``cfg`` (a ``ModelConfig``), in a fixed order."""
    out = []
    if cfg.family in ("titans", "titans-mag", "titans-mal", "titans-mac"):
        out += _titans(cfg)
    if cfg.family == "hope":
        out += _selfmod(cfg)
    if cfg.family in ("hope", "hope-attention"):
        out += _cms(cfg)
    return out


def optimizer_readings(name: str, hparams: dict | None = None) -> list[Reading]:
    """The readings of the outer optimizer ``name`` with ``hparams`` (registry defaults elsewhere)."""
    from nlref.reference import optimizers

    if name not in optimizers.NAMES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(optimizers.NAMES)}")
    hp = {**optimizers.DEFAULTS[name], **(hparams or {})}
    out = []
    if name in ("adam", "adamw") and hp.get("form", "standard") == "standard":
        out.append(Reading("adam-form", "Adam's moments are EMAs with bias correction (torch's Adam, "
                           "form = \"standard\")",
                           "the sums M += beta1 g, H += beta2 g^2 (Eqs. 102, 105; form = \"paper\")",
                           "optimizers"))
    if name == "preconditioned_momentum":
        out.append(Reading("precond-retention", "m <- alpha m - eta P G keeps the retention alpha",
                           "Eq. 47 as printed omits alpha (the text has it)", "optimizers"))
    if name == "delta_momentum":
        if hp.get("normalize", True):
            out.append(Reading("delta-normalised", "zeta = delta / ||G||_F^2, the normalised (NLMS) step "
                               "(normalize = true)",
                               "m (alpha I - G^T G) - eta P G with a bare G^T G (Eq. 49; normalize = false)",
                               "optimizers"))
    if name == "deep_momentum":
        out.append(Reading("deep-unit-key-read", "the update reads the memory at the unit keys, "
                           "Delta W = M + W1 tanh(W2)",
                           "W + m(u_i) (Eq. 50), which does not have W's shape", "optimizers"))
    if name == "m3":
        out.append(Reading("m3-signs", "signs and frequency of Algorithm 1 (+beta3, every f steps) and "
                           "a chunk sum of exactly f gradients",
                           "Eq. 75's -beta2 and C-hat, and Algorithm 1 line 3's f + 1 terms", "optimizers"))
    return out


def lines(readings: list[Reading]) -> list[str]:
    """The CLI's lines: a heading, then one line per reading (or a line saying there are none)."""
    if not readings:
        return ["readings that differ from the paper's letter: none"]
    return ["readings that differ from the paper's letter (each with its reason in SPEC.md):"] + [
        f"  ! {r.line()}" for r in readings]
