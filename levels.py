"""The levels of a model: every nested learning problem, its update frequency, context and objective.

Paper: §3, Definitions 2-4, Eqs. (19)-(20), arXiv 2512.24695v1 (a level is a set of optimisation
problems that share an update frequency; higher level = lower frequency). SPEC: SPEC.md#hope (the
blocks), SPEC.md#chunks, SPEC.md#selfmod, SPEC.md#titans, SPEC.md#cms, SPEC.md#optimizers.

``levels(cfg)`` lists, fastest first, every component of a model preset that learns (or is read)
at its own frequency:

- ``attention`` (transformer, hope-attention): no write; a cache over the sequence so far, read by
  softmax attention, the non-parametric solution of an l2 regression (Eqs. 62-63, "frequency
  infinity" in the paper's words);
- ``memory`` (titans, hope, the linear families): the block's sequence memory, written every
  token; the Titans-style layers read and take inner gradients at the state of the last chunk
  boundary (SPEC.md#chunks), so their state changes what the layer computes every ``C`` tokens;
- ``cms``: a CMS level, one GD step on the next-token loss of its own ``C^(l)`` tokens at the end
  of each of its chunks (Eq. 71); frozen in context when its period is None or
  ``cfg.cms_in_context`` is False;
- ``mlp``: a SwiGLU MLP (transformer, titans, linear families): frozen in context;
- ``optimizer-memory``: the outer optimizer's own memories (AdamW's m and v, Appendix B), updated
  every training step, before the weights that read them;
- ``outer``: the outer parameters that only the outer optimizer moves (embedding, norms, head, the
  CMS aggregation weights), updated every step of ``B x T`` tokens on the mean next-token loss.

Parameter counts partition the model's parameters by component (each row's ``params`` are the
outer parameters of that component: a memory's meta-learned initial state and its static
projections, a CMS level's initial weights), so they sum to the model's total; every one of them is
trained by the outer optimizer (the ``outer`` row says so). ``state`` is the number of floats the
row writes in context per sequence (the attention row: per token of context).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from nlref.reference import readings
from nlref.reference.contract import meta_parents

KINDS = ("attention", "memory", "cms", "mlp", "optimizer-memory", "outer")


@dataclass(frozen=True)
class Level:
    """One row of the levels table (``levels``)."""

    name: str  # e.g. "blocks.0.mem", "blocks.1.cms.2", "optimizer", "outer"
    kind: str  # one of KINDS
    every: str  # how often it changes, short ("1 token", "16 tokens", "frozen", "1 step")
    period: int | None  # tokens between two changes (a step: B x T tokens); None: never in context
    unit: str  # "tokens" (in context) or "steps" (training steps)
    context: str  # the data it learns from, short
    objective: str  # the loss its updates minimise, short, with its equation
    params: int  # outer parameters of this component
    state: int  # floats written in context per sequence (attention: per token; optimizer: per model)
    spec: str  # SPEC.md anchor
    detail: str = ""  # one sentence more (JSON and the notes under the table)
    keys: tuple[str, ...] = ()  # its parameter keys (model.param_shapes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keys"] = list(self.keys)
        return d


def _selfmod_memories(cfg) -> list[str]:
    """The self-modifying layer's in-context memories of ``cfg``, as M_<name>, written order."""
    from nlref.reference.contract import layer_config, reference_layer

    return [f"M_{m}" for m in layer_config(reference_layer(cfg.family), cfg).memories]


def _rule_text(cfg) -> tuple[str, str]:
    """(short objective, detail) of a block's sequence memory."""
    if cfg.family == "hope":
        mems = ", ".join(_selfmod_memories(cfg))
        static = [c for c in ("q", "k", "v") if not getattr(cfg, f"mem_adaptive_{c}", True)]
        rule = "DGD with retention" if cfg.mem_dgd else "GD with retention (no DGD, Table 6)"
        return ("||M(k) - v_hat||^2, v_hat = M(v) (Eqs. 84-88)",
                f"self-modifying Titans: each of {mems} regresses k_t onto its own target v_hat_t = M(v_t), "
                f"by {rule}{' and momentum' if cfg.mem_momentum else ''}"
                + (f"; {', '.join(static)} from static projections" if static else ""))
    if cfg.family == "titans":
        return ("||M(k) - v||^2 (Titans Eq. 12)",
                "Titans memory: GD on its surprise with momentum and retention (Titans Eqs. 9-18)")
    if cfg.family == "titans-mag":
        return ("||M(k) - v||^2 (Titans Eq. 12)",
                f"Titans memory, MAG's gate branch (SPEC.md#titans-mag): GD on its surprise with momentum and "
                f"retention (Titans Eqs. 9-18) over the {cfg.mem_persistent} persistent tokens and the sequence")
    if cfg.family == "titans-mal":
        return ("||M(k) - v||^2 (Titans Eq. 12)",
                f"Titans memory, MAL's first layer (SPEC.md#titans-mal): GD on its surprise with momentum and "
                f"retention (Titans Eqs. 9-18) over the {cfg.mem_persistent} persistent tokens and the sequence; "
                f"the sliding-window attention reads its output")
    if cfg.family == "titans-mac":
        return ("||M(k) - v||^2 (Titans Eq. 12)",
                f"Titans memory, MAC's context (SPEC.md#titans-mac): GD on its surprise with momentum and "
                f"retention (Titans Eqs. 9-18), written with the attention's outputs; read at each "
                f"{cfg.attn_window}-token segment's start for the attention's retrieved tokens, and to gate its output")
    if cfg.family == "linear-attention":
        return "-<M k, v> (Eqs. 14-18)", "linear attention: one GD step of rate 1 on the dot product; M_0 = 0"
    if cfg.family == "deltanet":
        return "1/2 ||M k - v||^2 (Eq. 65)", "DeltaNet: the delta rule, rate beta_t; M_0 = 0"
    if cfg.family == "dgd":
        return ("1/2 ||M k - v||^2 + 1/(2 beta) ||M - M_prev||^2 (Eqs. 56-57)",
                "DGD layer: the exact proximal step (rate beta' = beta / (1 + beta ||k||^2)) with retention "
                "alpha_t; M_0 = 0")
    return "1/2 ||M k - v||^2 (Eq. 65)", "Gated DeltaNet: the delta rule with retention alpha_t, rate beta_t; M_0 = 0"


def _memory_state(cfg) -> dict[str, int]:
    """Floats of block 0's memory-layer state per sequence, by state key: from the public model API
    (the state after one token of one sequence of the same model cut to one block: every block's
    layer has the same state, and a 125M preset's full initialisation would take seconds)."""
    import dataclasses

    import numpy as np

    from nlref.reference import model

    one = dataclasses.replace(cfg, n_layers=1)
    _, state = model.forward(model.init_params(one, seed=0), np.zeros((1, 1), dtype=np.int64), one)
    return {k: int(np.size(v)) for k, v in state["mem"][0].items()
            if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def _tokens(n: int) -> str:
    return "1 token" if n == 1 else f"{n} tokens"


def levels(cfg, batch_size: int | None = None, seq_len: int | None = None,
           optimizer: str | None = None) -> list[Level]:
    """Every level of the model ``cfg`` (a ModelConfig or a preset name), fastest first.

    Order: by the tokens between two changes (attention's cache, the sequence memories, the
    in-context CMS levels), the components frozen in context, then the outer optimizer's memories
    and the outer parameters (one step = ``batch_size x seq_len`` tokens; default TrainConfig's
    4 x 128, optimizer AdamW). Within one period a faster kind comes first (its state is needed
    by the next), then the blocks in order. The rows' ``params`` sum to
    ``sum(model.param_counts(cfg).values())``.
    """
    import numpy as np

    from nlref.reference import config as config_mod
    from nlref.reference import model
    from nlref.training import TrainConfig

    if isinstance(cfg, str):
        cfg = config_mod.preset(cfg)
    B = TrainConfig.batch_size if batch_size is None else int(batch_size)
    T = TrainConfig.seq_len if seq_len is None else int(seq_len)
    opt = TrainConfig.optimizer if optimizer is None else optimizer
    if B < 1 or T < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {B} and {T}")
    from nlref.reference import optimizers

    outer_opt = optimizers.make(opt)  # unknown name: ValueError listing the valid ones
    shapes = model.param_shapes(cfg)
    size = {k: int(np.prod(s)) for k, s in shapes.items()}
    taken: set[str] = set()
    rows: list[tuple[tuple, Level]] = []  # (sort key, level)
    rank = {k: n for n, k in enumerate(KINDS)}
    frozen = float("inf")

    def add(order, name, keys, **kw):
        keys = tuple(keys)
        taken.update(keys)
        level = Level(name=name, params=sum(size[k] for k in keys), keys=keys, **kw)
        rows.append(((order[0], rank[level.kind]) + tuple(order[1:]), level))

    D = cfg.d_model
    seq = "the sequence so far"
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        block = [k for k in shapes if k.startswith(b)]
        attn = [k for k in block if k.startswith(b + "attn.")]
        if attn:
            ctx = seq + " (KV cache)"
            if cfg.family == "titans-mag":  # SW-Attn*: the window and the persistent tokens (SPEC.md#titans-mag)
                ctx = f"the last {cfg.attn_window} tokens and {cfg.mem_persistent} persistent ones (KV cache)"
            if cfg.family == "titans-mal":  # SW-Attn over the memory's output (SPEC.md#titans-mal)
                ctx = f"the memory's output at the last {cfg.attn_window} tokens (KV cache)"
            if cfg.family == "titans-mac":  # attention inside each segment (SPEC.md#titans-mac)
                ctx = (f"its {cfg.attn_window}-token segment so far, the memory's retrieval for it and "
                       f"{cfg.mem_persistent} persistent tokens (KV cache)")
            add((1, i), f"{b}attn", attn, kind="attention", every="1 token", period=1, unit="tokens",
                context=ctx, objective="none written (Eqs. 62-63)", state=2 * D,
                spec="SPEC.md#primitives",
                detail="softmax attention: no write, a cache of (k_t, v_t); each read is the solution of "
                       "min_M sum_i s(k_i, q) ||v_i - M||^2 over the cache (frequency 'infinity')")
        mem = [k for k in block if k.startswith(b + "mem.")]
        if mem:
            objective, detail = _rule_text(cfg)
            st = _memory_state(cfg)
            if cfg.family in ("titans", "hope", "titans-mag", "titans-mal", "titans-mac"):
                spec = "SPEC.md#" + {"hope": "selfmod", "titans": "titans"}.get(cfg.family, cfg.family)
                if cfg.family == "hope" and cfg.mem_chunk != cfg.mem_chunk_other:
                    # two clocks (Eq. 90): M_memory and the other memories are two levels
                    mm = [k for k in mem if k.startswith(b + "mem.memory.")]
                    other = [k for k in mem if len(k.split(".")) > 4 and k not in mm]
                    static = [k for k in mem if k not in mm and k not in other]
                    parts = [(" (M_memory)", cfg.mem_chunk, mm + static,
                              sum(n for s, n in st.items() if s.startswith("memory."))),
                             (f" ({', '.join(m for m in _selfmod_memories(cfg) if m != 'M_memory')})",
                              cfg.mem_chunk_other, other,
                              sum(n for s, n in st.items() if not s.startswith("memory.")))]
                else:
                    parts = [("", cfg.mem_chunk, mem, sum(st.values()))]
                for tag, C, keys, n_state in parts:
                    add((C, i), f"{b}mem{tag}", keys, kind="memory", every=f"{_tokens(C)} (written every token)",
                        period=C, unit="tokens", context=seq + f", in {C}-token chunks", objective=objective,
                        state=n_state, spec=spec,
                        detail=detail + f"; written every token, read and differentiated at the state of the "
                                        f"last {C}-token chunk boundary (SPEC.md#chunks); reset to its "
                                        f"meta-learned initial state at each sequence start")
            else:
                add((1, i), f"{b}mem", mem, kind="memory", every="1 token", period=1, unit="tokens",
                    context=seq, objective=objective, state=sum(st.values()), spec="SPEC.md#linear-families",
                    detail=detail + "; written every token and read after the write (Eq. 15)")
        parents = meta_parents(cfg)
        for l, lv in enumerate(cfg.cms_levels):
            keys = [k for k in block if k.startswith(f"{b}cms.{l}.")]
            if cfg.cms_in_context and lv.period is not None:
                add((lv.period, i, l), f"{b}cms.{l}", keys, kind="cms", every=_tokens(lv.period), period=lv.period,
                    unit="tokens", context=f"its own {lv.period}-token chunks", objective="NTP loss of its chunk (Eq. 71)",
                    spec="SPEC.md#cms",
                    detail=f"CMS level (hidden {lv.hidden}): at the end of each of its {lv.period}-token chunks, "
                           f"one GD step of eta {lv.eta:g} on the summed next-token loss of that chunk's tokens; "
                           f"per sequence, reset to its meta-learned initial weights (Eq. 73) at each sequence start"
                           + (f"; nested (Eq. 72): its initial weights are a state that level cms.{parents[l]} "
                              f"meta-learns, and it restarts from them every {cfg.cms_levels[parents[l]].period} "
                              "tokens" if l in parents else ""),
                    state=2 * D * lv.hidden * (2 if l in parents else 1))
            else:
                why = "period None" if lv.period is None else f"cms_in_context = false, period {lv.period} unused"
                add((frozen, i, l), f"{b}cms.{l}", keys, kind="cms", every=f"frozen ({why})", period=None,
                    unit="tokens", context="-", objective="-", state=0, spec="SPEC.md#cms",
                    detail=f"CMS level (hidden {lv.hidden}) frozen in context: only the outer optimizer moves it")
        mlp = [k for k in block if k.startswith(b + "mlp.")]
        if mlp:
            add((frozen, i, 99), f"{b}mlp", mlp, kind="mlp", every="frozen", period=None, unit="tokens",
                context="-", objective="-", state=0, spec="SPEC.md#hope",
                detail="SwiGLU MLP: frozen in context (frequency 0 once trained); only the outer optimizer moves it")
    total = sum(size.values())
    step = f"1 step = {B} x {T} = {B * T:,} tokens"
    zeros = {k: np.zeros(sh, dtype=cfg.dtype) for k, sh in shapes.items()}  # the state's size needs shapes only
    opt_state = sum(int(np.size(v)) for v in outer_opt.init(zeros).values() if isinstance(v, np.ndarray))
    add((frozen + 1,), "optimizer", [], kind="optimizer-memory", every="1 step", period=B * T, unit="steps",
        context="the outer gradients", state=opt_state, spec="SPEC.md#optimizers",
        objective="Eqs. 100-105 (m, v)" if opt in ("adam", "adamw") else "Section 4",
        detail=f"the outer optimizer's memories ({opt}; {step}): "
               + ("AdamW's m and v, the optimal element-wise associative memories of the gradients "
                  "(Appendix B, Eqs. 100-105)" if opt in ("adam", "adamw") else
                  "a memory that compresses the gradients (Section 4, SPEC.md#optimizers)")
               + "; updated before the weights that read them, so one level faster")
    rest = [k for k in shapes if k not in taken]
    add((frozen + 1,), "outer", rest, kind="outer", every="1 step", period=B * T, unit="steps",
        context="the training set", objective="mean NTP loss", state=0, spec="SPEC.md#outer-gradient",
        detail=f"the outer level ({step}): {opt} trains all {total:,} parameters on the mean next-token "
               f"cross-entropy, the rows above included (their initial states and static weights); this "
               f"row's own are those no faster level has (embedding, norms, head"
               + (", MAG's persistent tokens and gate" if cfg.family == "titans-mag" else "")
               + (", MAL's persistent tokens and norm" if cfg.family == "titans-mal" else "")
               + (", MAC's persistent tokens, retrieval query and gate" if cfg.family == "titans-mac" else "")
               + (", CMS aggregation weights" if cfg.cms_variant == "independent" and cfg.cms_levels else "") + ")")
    return [lv for _, lv in sorted(rows, key=lambda r: r[0])]


def table(cfg, batch_size: int | None = None, seq_len: int | None = None, optimizer: str | None = None) -> str:
    """The levels of ``cfg`` as a text table, fastest first (``nested-learning levels``)."""
    from nlref.reference import config as config_mod

    if isinstance(cfg, str):
        cfg = config_mod.preset(cfg)
    rows = levels(cfg, batch_size, seq_len, optimizer)
    head = ("level", "every", "context", "objective", "params", "state")
    cells = []
    for lv in rows:
        state = f"{lv.state:,}" + ("/token" if lv.kind == "attention" else "")
        if lv.kind == "optimizer-memory":
            state += " (model)"
        cells.append((lv.name, lv.every, lv.context, lv.objective, f"{lv.params:,}", state if lv.state else "-"))
    widths = [max(len(r[c]) for r in cells + [head]) for c in range(len(head))]
    right = (False, False, False, False, True, True)

    def line(r):
        return "  ".join(f"{x:>{w}}" if rt else f"{x:<{w}}" for x, w, rt in zip(r, widths, right, strict=True)).rstrip()

    total = sum(lv.params for lv in rows)
    out = [f"{cfg.name}: family {cfg.family}, {cfg.n_layers} blocks, width {cfg.d_model}: {len(rows)} levels, "
           f"fastest first", line(head)]
    out += [line(r) for r in cells]
    out.append(line(("total", "", "", "", f"{total:,}", "")))
    out.append("every: tokens (or outer steps) between two changes of the level's state; params: the "
               "component's outer parameters (all trained by the outer optimizer); state: floats it writes "
               "in context per sequence")
    seen = set()
    for lv in rows:
        if lv.detail and lv.detail not in seen:
            seen.add(lv.detail)
            out.append(f"  {lv.name}: {lv.detail} [{lv.spec}]")
    out += readings.lines(_readings(cfg, optimizer))
    return "\n".join(out)


def _readings(cfg, optimizer: str | None) -> list:
    """The pinned readings of the model and its outer optimizer that differ from the paper's letter."""
    from nlref.training import TrainConfig

    return readings.model_readings(cfg) + readings.optimizer_readings(
        TrainConfig.optimizer if optimizer is None else optimizer)


def to_json(cfg, batch_size: int | None = None, seq_len: int | None = None, optimizer: str | None = None) -> str:
    """The levels of ``cfg`` as JSON: ``{"model", "family", "total_params", "levels": [...]}``."""
    from nlref.reference import config as config_mod

    if isinstance(cfg, str):
        cfg = config_mod.preset(cfg)
    rows = levels(cfg, batch_size, seq_len, optimizer)
    return json.dumps({"model": cfg.name, "family": cfg.family, "total_params": sum(lv.params for lv in rows),
                       "levels": [lv.to_dict() for lv in rows],
                       "readings": [dataclasses.asdict(r) for r in _readings(cfg, optimizer)]}, indent=2)
