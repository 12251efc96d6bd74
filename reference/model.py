"""The language model behind one API: Hope, Hope-attention, Titans and Transformer++ blocks.

Paper: §7-§8.3, Eqs. (70)-(74), (94)-(97), arXiv 2512.24695v1 (Titans: Titans Eqs. 9-18).
SPEC: SPEC.md#hope (block families, processing order, presets), SPEC.md#cms (the first-order
in-context CMS), SPEC.md#public-api, SPEC.md#backends (one driver, every backend).

The one model driver (with reference/blocks.py): the state, the chunk-major loop, the CMS writes
and the outer gradient exist once, here, and compute with the array code of a backend, the
``ops`` argument every public function takes (reference/contract.py ``Ops``; default
``REFERENCE``: NumPy and the reference's own modules). The CPU port passes its compiled modules,
the GPU port the reference's modules over CuPy (``bind(ops)`` gives the API with ``ops`` fixed).

Symbols (paper symbol -> code name, shape; B batch, T tokens, D width, H heads, dh = D / H,
V vocabulary, C the processing chunk, L CMS levels):

    x_t (tokens)         tokens                 (B, T) ints in [0, V)
    embedding            params["embed.E"]      (V, D)
    W_q, W_k, W_v, W_o   blocks.i.attn.Wq ...   (D, D)   (linear convention W (D_out, D_in))
    RMSNorm gains        blocks.i.norm1.g ...   (D,)
    MLP^(f_l)            blocks.i.cms.l.W1/W2   (D, Hm), (Hm, D)   initial (meta-learned) state
    theta^(f_l)_t        state["cms"][i]        (B, D, Hm), (B, Hm, D) per sequence, in context
    SwiGLU MLP           blocks.i.mlp.W_gate/W_up/W_down   (F, D), (F, D), (D, F)
    Titans memory layer  blocks.i.mem.*         see reference/titans.py
    head                 params["head.W"]       (V, D)
    logits               logits                 (B, T, V)

Decisions where the paper is open (each in SPEC.md#hope unless noted):
    - every block is pre-norm residual with RMSNorm: h = x + mixer(norm1(x)); the second
      sublayer adds SwiGLU(norm2(h)) (transformer, titans) or the CMS chain's change
      CMS(u) - u with u = norm2(h) (hope, hope-attention); a final RMSNorm and an untied head;
    - chunk-major processing where CMS is in context (the processing chunk C is the shortest
      in-context period): each chunk runs all blocks with the fast states from before it;
      a level's CMS write happens when the token after its chunk arrives (it is the last
      position's target), so one call over T tokens equals any chain of streaming calls;
    - a level's write (Eq. 71) is the gradient of the summed next-token loss of its own C^(l)
      tokens, from a re-run of its own chunk with everything before that chunk held fixed
      (SPEC.md#cms, spec 0.2): no level's write depends on another level's period;
    - the outer gradient treats the in-context CMS increments as constants (first order,
      SPEC.md#cms); ``cms_increments`` / ``loss_with_increments`` are the test hook;
    - initialisation: ``np.random.SeedSequence(seed).spawn`` gives one generator per component
      (embedding, each block, head), parameters are drawn in float64 and cast to ``cfg.dtype``.
"""

from __future__ import annotations

import functools
import types

import numpy as np

from . import blocks, cms, primitives
from .config import ModelConfig
from .contract import (
    STATE_KEYS,
    Ops,
    check_params,
    check_state,
    check_tokens,
    copy_tree,
    factored_levels,
    has_attention,
    has_cms,
    in_context_levels,
    is_hybrid,
    layer_config,
    lowest_layer_once,
    meta_parents,
    param_shapes,
    reference_layer,
    selfmod_switches,
)

REFERENCE = Ops(name="reference", np=np, primitives=primitives, cms=cms, layer=reference_layer)
"""The reference's ops: NumPy and the reference's modules, none of the ports' savings."""

__all__ = ["REFERENCE", "STATE_KEYS", "bind", "cms_increments", "forward", "init_params", "init_state",
           "loss_and_grads", "loss_with_increments", "param_counts", "param_shapes", "selfmod_switches",
           "state_size"]

# ---------------------------------------------------------------------------------------------
# Parameters (the layout, reference/contract.py param_shapes, is the same on every backend)
# ---------------------------------------------------------------------------------------------


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random initial parameters in ``cfg.dtype``: the same seed gives the same arrays.

    One generator per component from ``SeedSequence(seed).spawn`` (embedding, each block, head),
    drawn in float64: N(0, init_std^2) for matrices, output projections (attention Wo, SwiGLU
    W_down, CMS W1, MAG's and MAC's W_out) scaled by 1/sqrt(2 n_layers), norm gains 1, CMS ``agg`` 1,
    the persistent tokens (MAG's, MAL's, MAC's) N(0, 1); the memory layer uses its own module's initialisation
    (SPEC.md#hope, SPEC.md#titans-mag, SPEC.md#titans-mal, SPEC.md#titans-mac).
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig (config.preset(name)), got {type(cfg).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    dtype = np.dtype(cfg.dtype)
    shapes = param_shapes(cfg)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(cfg.n_layers + 2)]
    std, out_std = cfg.init_std, cfg.init_std / np.sqrt(2 * cfg.n_layers)
    params: dict[str, np.ndarray] = {}
    params["embed.E"] = std * rngs[0].standard_normal(shapes["embed.E"])
    for i in range(cfg.n_layers):
        rng, b = rngs[1 + i], f"blocks.{i}."
        if not has_attention(cfg):
            module = reference_layer(cfg.family)
            for n, w in module.init_params(layer_config(module, cfg), rng, dtype=np.float64).items():
                params[b + "mem." + n] = w
        for key, shape in shapes.items():
            if not key.startswith(b) or key in params:
                continue
            name = key[len(b):]
            if name.endswith(".g") or name.endswith("agg"):
                params[key] = np.ones(shape)
            elif name in ("mag.persist", "mal.persist", "mac.persist"):  # N(0, 1): the scale of the RMS-normalised tokens beside them
                params[key] = rng.standard_normal(shape)
            elif name in ("attn.Wo", "mlp.W_down", "mag.W_out", "mac.W_out") or name.endswith(".W1"):
                params[key] = out_std * rng.standard_normal(shape)
            else:
                params[key] = std * rng.standard_normal(shape)
    params["final_norm.g"] = np.ones(shapes["final_norm.g"])
    params["head.W"] = std * rngs[-1].standard_normal(shapes["head.W"])
    return {k: np.asarray(params[k], dtype=np.float64).astype(dtype) for k in shapes}


# ---------------------------------------------------------------------------------------------
# State and the chunk-major forward (SPEC.md#hope: the processing order)
# ---------------------------------------------------------------------------------------------


def init_state(params, cfg: ModelConfig, batch: int, *, ops: Ops = REFERENCE) -> dict:
    """The state at the start of B sequences: position 0, empty attention caches, fresh memory
    layers, every in-context CMS level at its meta-learned initial weights (one copy per
    sequence), and an empty record of the open level chunks (``window``, ``history``)."""
    xp = ops.np
    params = check_params(params, cfg, xp)
    state: dict = {"batch": int(batch), "pos": 0, "past": [None] * cfg.n_layers, "mem": [None] * cfg.n_layers,
                   "cms": [], "window": xp.zeros((batch, 0), dtype=np.int64), "history": []}
    children = meta_parents(cfg)
    for i in range(cfg.n_layers):
        fast = {}
        for l in in_context_levels(cfg):
            for n in ("W1", "W2"):
                w0 = params[f"blocks.{i}.cms.{l}.{n}"]
                fast[f"{l}.{n}"] = xp.broadcast_to(w0, (batch,) + w0.shape).copy()  # theta^(f_l)_0
                if l in children:  # nested CMS: the initial state is itself in context (Eq. 72)
                    fast[f"{l}.{n}_0"] = fast[f"{l}.{n}"].copy()
        state["cms"].append(fast)
    return state


def level_weights(ops, params, i, l, fasts, batch):
    """(W1, W2) of block i's CMS level l as (B, G, ...), one group per entry of ``fasts`` (each a
    ``state["cms"]``-like list: the in-context weights in force during that group), or the outer
    parameter shared by the batch (one group) for a level frozen in context."""
    xp = ops.np
    if f"{l}.W1" not in fasts[0][i]:
        return tuple(xp.broadcast_to(params[f"blocks.{i}.cms.{l}.{n}"],
                                     (batch, 1) + params[f"blocks.{i}.cms.{l}.{n}"].shape) for n in ("W1", "W2"))
    if len(fasts) == 1:
        return tuple(fasts[0][i][f"{l}.{n}"][:, None] for n in ("W1", "W2"))
    if ops.cms_group_lists:  # the per-group arrays as they are (the port's CMS takes lists)
        return tuple([f[i][f"{l}.{n}"] for f in fasts] for n in ("W1", "W2"))
    return tuple(xp.stack([f[i][f"{l}.{n}"] for f in fasts], axis=1) for n in ("W1", "W2"))


def cms_weights(ops, params, cfg, state):
    """Per block, per level: the weights in force now as (B, 1, ...), for a segment inside one
    processing chunk (every level's weights are constant there)."""
    if not has_cms(cfg):
        return None
    return [[level_weights(ops, params, i, l, [state["cms"]], state["batch"]) for l in range(len(cfg.cms_levels))]
            for i in range(cfg.n_layers)]


def open_chunk_start(cfg: ModelConfig, pos: int) -> int:
    """The earliest position whose tokens, memory-layer states and CMS weights the state must keep
    at position ``pos`` (after the writes due there): the start of the oldest open chunk of an
    in-context level, min_l floor(pos / C^(l)) C^(l)."""
    return min((pos // cfg.cms_levels[l].period) * cfg.cms_levels[l].period for l in in_context_levels(cfg))


def open_level_starts(cfg: ModelConfig, pos: int) -> set[int]:
    """The start of each in-context level's open chunk at position ``pos`` (after the writes due
    there), floor(pos / C^(l)) C^(l): the only positions a later write's re-run starts from, so the
    only history records whose memory-layer states are still needed (the others keep their CMS
    weights, which a re-run reads per group, and drop ``mem``)."""
    return {(pos // cfg.cms_levels[l].period) * cfg.cms_levels[l].period for l in in_context_levels(cfg)}


def lowest_mixers(cfg: ModelConfig, lowest, start: int, end: int, mixers=None):
    """``stack_forward``'s ``mixers`` for positions [start, end) with block 0's layer output taken from
    ``lowest`` (B, T, D), that layer's output over the whole pass (``Ops.lowest_layer_once``; no
    cache: a re-run's backward stops above it, ``cms_grads_only``), the other blocks' from
    ``mixers`` (or run). None without ``lowest``."""
    if lowest is None:
        return mixers
    return [(lowest[:, start:end], None)] + (list(mixers[1:]) if mixers else [None] * (cfg.n_layers - 1))


def advance(ops, params, cfg, state, seg, lowest=None, written=None):
    """Forward a segment that lies inside one processing chunk; update the state in place.
    Returns (logits, the stack cache). ``lowest``: see ``lowest_mixers`` (then block 0's layer
    state is not advanced: ``state["mem"][0]`` is None).

    At a processing chunk's start, the memory layers' states and the CMS weights in force are
    appended to ``state["history"]``: a level's write re-runs its chunk from them. ``written``:
    the factored writes just made at this position (``apply_writes``), kept in the record as
    ``"writes"`` (``thin_record``)."""
    n = seg.shape[1]
    if cfg.cms_chunk is not None and state["pos"] % cfg.cms_chunk == 0:
        mem = copy_tree(state["mem"]) if ops.copy_history else state["mem"]
        record = {"start": state["pos"], "mem": mem, "cms": [dict(fast) for fast in state["cms"]]}  # writes make new arrays
        if written:
            record["writes"] = written
        state["history"].append(record)
    groups = [[(0, n)] for _ in cfg.cms_levels]
    mixers = lowest_mixers(cfg, lowest, state["pos"], state["pos"] + n)
    logits, cache, new_past, new_mem = blocks.stack_forward(ops, params, cfg, seg, state["pos"], state["past"],
                                                            state["mem"], cms_weights(ops, params, cfg, state), groups,
                                                            mixers)
    state["past"], state["mem"] = new_past, new_mem
    state["pos"] += n
    if cfg.cms_chunk is not None:
        state["window"] = ops.np.concatenate([state["window"], seg], axis=1)
    return logits, cache


def level_chunk_inputs(ops, params, cfg: ModelConfig, state, start: int, next_token):
    """What re-running the level chunk [start, pos) needs, from the state at ``pos``: its tokens
    X (B, n) and targets (B, n) (the next tokens, ``next_token`` last), the attention cache prefix
    [0, start), the memory layers' states at ``start``, and per block and level the CMS weights
    in force in each of that level's chunks inside [start, pos) with those groups."""
    pos, window = state["pos"], state["window"]
    X = window[:, start - (pos - window.shape[1]):]
    n = X.shape[1]
    targets = ops.np.concatenate([X[:, 1:], next_token[:, None]], axis=1)
    past = [None if pk is None else (pk[0][:, :, :start], pk[1][:, :, :start]) for pk in state["past"]]
    by_start = {h["start"]: h for h in state["history"]}
    groups, cms_w = [], []
    for lv in cfg.cms_levels:  # (only called with levels in context: cms_chunk is not None)
        groups.append(cms.groups_for(lv.period, start, n))
    for i in range(cfg.n_layers):
        cms_w.append([recorded_weights(ops, params, cfg, i, l, [by_start[start + s] for s, _ in groups[l]],
                                       state["batch"]) for l in range(len(cfg.cms_levels))])
    return X, targets, past, by_start[start]["mem"], cms_w, groups


def recorded_weights(ops, params, cfg: ModelConfig, i, l, records, batch):
    """``level_weights`` of block i's level l at the history ``records`` (one per group of the
    level). Where a record keeps a factored write's factors instead of its weights (``thin_record``),
    the weights in force are rebuilt in order from the first record's, which an open level chunk's
    start always keeps: a ``cms.Replay`` (bitwise the arrays the writes made; every later record is
    one of the level's writes and keeps its factors)."""
    keys = (f"{l}.W1", f"{l}.W2")
    if keys[0] not in records[0]["cms"][i] or all(r["cms"][i][keys[0]] is not None for r in records):
        return level_weights(ops, params, i, l, [r["cms"] for r in records], batch)
    pair = []
    for key in keys:
        weights = ops.cms.Replay(records[0]["cms"][i][key], cfg.cms_levels[l].eta, ops.cms.write_factors)
        for r in records[1:]:
            weights.append(ops.cms.Factors(*r["writes"][i][key]))
        pair.append(weights if ops.cms_group_lists else ops.np.stack(list(weights), axis=1))
    return tuple(pair)


def thin_record(cfg: ModelConfig, record, factored) -> dict:
    """A history record that is no longer an open level chunk's start (``open_level_starts``): no
    memory-layer states (a re-run starts only at such a start), and for each level of ``factored``
    (``factored_levels``) no weights where it keeps that level's write as factors (``"writes"``,
    ``Ops.cms_factored_writes``) or where the level does not write (its start is not a multiple of
    the period): a re-run reads a faster level's weights only at its own start and at that level's
    writes inside its chunk, and ``recorded_weights`` rebuilds them from the start's. At a period-1
    level that is one (D, Hm) pair per token and block held as D + Hm numbers."""
    if not factored:
        return dict(record, mem=None)
    writes = record.get("writes")
    cms_kept = []
    for i, fast in enumerate(record["cms"]):
        fast = dict(fast)
        for l in factored:
            for key in (f"{l}.W1", f"{l}.W2"):
                if key in fast and (record["start"] % cfg.cms_levels[l].period or (writes and key in writes[i])):
                    fast[key] = None
        cms_kept.append(fast)
    return dict(record, mem=None, cms=cms_kept)


def level_chunk_gradient(ops, params, cfg, state, start, next_token, fwd=None, mixers=None, wanted=None):
    """Per block, per level: the gradient of the summed next-token loss of the tokens
    [start, pos) with respect to the CMS weights in force there, everything before ``start``
    held fixed (Eq. 71, SPEC.md#cms). Returns dcms[i][l] = (dW1, dW2) of shape (B, G_l, ...).

    ``fwd``: (logits, stack cache) of the chunk [start, pos) when this call forwarded it in one
    piece (``Ops.reuse_chunk_forward``): the same inputs, so it is not re-run. ``mixers``: per
    block, (o, cache) of its sequence-memory layer over [start, pos) merged from the processing
    chunks' own caches (``Ops.reuse_span_layers``, ``span_mixers``): the layers are not re-run.
    ``wanted``: which levels' gradients the write uses (``Ops.cms_grads_needed``; the others are
    None)."""
    P = ops.primitives
    if fwd is None:
        X, targets, past, mem, cms_w, groups = level_chunk_inputs(ops, params, cfg, state, start, next_token)
        logits, cache, _, _ = blocks.stack_forward(ops, params, cfg, X, start, past, mem, cms_w, groups, mixers)
    else:
        logits, cache = fwd
        X = state["window"][:, start - state["pos"]:]
        targets = ops.np.concatenate([X[:, 1:], next_token[:, None]], axis=1)
    _, c_ce = P.cross_entropy_forward(logits, targets)
    dlogits = P.cross_entropy_backward(ops.np.asarray(float(X.size), dtype=logits.dtype), c_ce)  # sum, not mean
    return blocks.stack_backward(ops, dlogits, cache, cfg, cms_only=ops.cms_grads_only, cms_wanted=wanted)[1]


def apply_writes(ops, cfg: ModelConfig, state, due_grads, record):
    """Eq. (71) for every level in ``due_grads`` ({l: dcms from its own chunk's re-run}), then
    forget the tokens, memory-layer states and CMS weights no open level chunk needs (a record
    keeps its memory-layer states, and its factored levels' weights, only while it is an open level
    chunk's start, ``open_level_starts``, ``thin_record``). The factored levels' weights are dropped
    only in the pass that fills ``record`` (``weights_in_force``, whose state is dropped after): a
    state ``forward`` returns keeps the layout every backend shares. Returns that pass's factored
    writes' factors, per block {"l.W1": (u, v), ...} (None without any), for the record ``advance``
    makes next.

    Nested CMS (Eq. 72, ``cfg.cms_nested``): when the chunk of a child's parent ends, the parent
    also takes a step on the child's initial state with the gradient of the parent chunk's summed
    loss with respect to the child's weights in force there (first order: summed over the child's
    chunks inside it), and the child restarts from that new initial state instead of its own
    write."""
    parents = meta_parents(cfg)
    written = [{} for _ in range(cfg.n_layers)]
    for l, dcms in due_grads.items():
        p = parents.get(l)
        for i in range(cfg.n_layers):
            fast = state["cms"][i]
            for j, n in enumerate(("W1", "W2")):
                if p in due_grads:  # Eq. (72): the parent's step on theta_0, then the reset
                    g0 = due_grads[p][i][l][j].sum(axis=1)  # (B, ...): over the child's chunks
                    fast[f"{l}.{n}_0"] = ops.cms.write(fast[f"{l}.{n}_0"], g0, cfg.cms_levels[p].eta)
                    new = fast[f"{l}.{n}_0"].copy()  # theta and theta_0 are separate arrays
                elif isinstance(dcms[i][l][j], ops.cms.Factors):  # Ops.cms_factored_writes
                    new = ops.cms.write_factors(fast[f"{l}.{n}"], dcms[i][l][j], cfg.cms_levels[l].eta)  # Eq. (71)
                    if record is not None:  # (u, v): the record of this position keeps them (thin_record)
                        written[i][f"{l}.{n}"] = tuple(dcms[i][l][j])
                else:
                    new = ops.cms.write(fast[f"{l}.{n}"], dcms[i][l][j][:, 0], cfg.cms_levels[l].eta)  # Eq. (71)
                if record is not None:  # the weights in force in the level's next chunk (a Replay: its factors)
                    rec = record.setdefault(f"blocks.{i}.cms.{l}.{n}", [])
                    rec.append(dcms[i][l][j] if isinstance(rec, ops.cms.Replay) else new)
                fast[f"{l}.{n}"] = new
    pos, start = state["pos"], open_chunk_start(cfg, state["pos"])
    starts = open_level_starts(cfg, pos)  # the only records a later re-run starts from
    factored = factored_levels(ops, cfg) if record is not None else set()  # a state forward returns: every weight
    state["history"] = [h if h["start"] in starts or h["mem"] is None else thin_record(cfg, h, factored)
                        for h in state["history"] if h["start"] >= start]
    state["window"] = state["window"][:, start - (pos - state["window"].shape[1]):]
    return written if any(written) else None


def span_mixers(ops, cfg: ModelConfig, span, start: int, end: int):
    """Per block, (o, cache) of its sequence-memory layer over [start, end), merged by the layer
    module's ``merge_caches`` from ``span``'s records (start position, per block the layer cache)
    of the processing chunks this call forwarded in one piece; None unless they tile [start, end)
    (a streaming call that began inside the span re-runs it). The merged layers computed the same
    function of the same inputs as a re-run from the history record at ``start`` (block 0 exactly;
    a higher block's input up to the rounding of the CMS weights' grouping, SPEC.md#fast-cpu)."""
    pieces = {s: c for s, c in span if start <= s < end}
    if sorted(pieces) != list(range(start, end, cfg.cms_chunk)):
        return None
    module = ops.layer(cfg.family)
    mixers = [None if pieces[start][i] is None else module.merge_caches([pieces[s][i] for s in sorted(pieces)])
              for i in range(cfg.n_layers)]  # (a block whose pieces carry no cache: lowest_mixers gives its layer)
    return None if any(m is None for m, c in zip(mixers, pieces[start], strict=True) if c is not None) else mixers


def wanted_at(ops, cfg: ModelConfig, period: int):
    """``cms.backward``'s ``wanted`` for the re-run of the levels of ``period`` (None without
    ``Ops.cms_grads_needed``): their gradients per group, and those of their nested children (the
    parent's step on the child's initial state, Eq. 72); every other level's are skipped."""
    if not ops.cms_grads_needed:
        return None
    own = {l for l in in_context_levels(cfg) if cfg.cms_levels[l].period == period}
    own |= {child for child, parent in meta_parents(cfg).items() if parent in own}
    factored = factored_levels(ops, cfg)  # Ops.cms_factored_writes: the chunk's per-token factors
    return [("factors" if l in factored else "groups") if l in own else "skip" for l in range(len(cfg.cms_levels))]


def complete_chunks(ops, params, cfg: ModelConfig, state, next_token, record, last=None, span=None, lowest=None):
    """The CMS writes due at position pos (a multiple of the processing chunk), now that the target
    of position pos - 1 has arrived: each level whose period ends here re-runs its own chunk
    [pos - C^(l), pos) from the states before it and applies Eq. (71) with that chunk's summed
    next-token-loss gradient (levels with the same period share one re-run).

    Returns ``apply_writes``'s factors (for the record of this position).

    ``last``: (logits, stack cache) of the last processing chunk when this call forwarded it in one
    piece; with ``Ops.reuse_chunk_forward`` it stands for the re-run of a level whose period is the
    processing chunk. ``span``: the records ``span_mixers`` reads (``Ops.reuse_span_layers``; a
    list kept by ``run``, cut here to the open level chunks). ``lowest``: see ``lowest_mixers``."""
    pos = state["pos"]
    due = cms.updates_at(cfg.cms_levels, pos, cfg.cms_in_context)
    due_grads, by_period = {}, {}
    for l in due:
        period = cfg.cms_levels[l].period
        if period not in by_period:
            reuse = last if ops.reuse_chunk_forward and period == cfg.cms_chunk else None
            mixers = span_mixers(ops, cfg, span, pos - period, pos) if span and reuse is None else None
            mixers = lowest_mixers(cfg, lowest, pos - period, pos, mixers) if reuse is None else None
            by_period[period] = level_chunk_gradient(ops, params, cfg, state, pos - period, next_token, reuse,
                                                     mixers, wanted_at(ops, cfg, period))
        due_grads[l] = by_period[period]
    written = apply_writes(ops, cfg, state, due_grads, record)
    if span is not None:
        span[:] = [piece for piece in span if piece[0] >= open_chunk_start(cfg, pos)]
    return written


def writes_due(cfg: ModelConfig, state) -> bool:
    """Whether CMS writes are due before the next token: the position is a processing chunk's end
    (a multiple of ``cfg.cms_chunk``, > 0) and the last processed token's target is missing. A call
    never processes the token at such a position before its writes, so this is the position alone."""
    C = cfg.cms_chunk
    return C is not None and state["pos"] > 0 and state["pos"] % C == 0


def run(ops, params, tokens, cfg, state, record=None, keep=None, lowest=None):
    """The chunk-major pass over tokens (B, T) from ``state`` (updated in place): logits (B, T, V).
    ``record`` receives the CMS increments (``cms_increments``); ``keep`` a list that receives, per
    forwarded piece, each block's sequence-memory layer cache (``Ops.reuse_layer_caches``; None for
    block 0 with ``lowest``); ``lowest``: block 0's layer output over tokens, from a fresh state at
    position 0 (``lowest_mixers``)."""
    T = tokens.shape[1]
    C = cfg.cms_chunk
    out, t, last = [], 0, None
    reusable = C is not None and ops.reuse_span_layers and C >= ops.reuse_min_chunk and not has_attention(cfg)
    span = [] if reusable and hasattr(ops.layer(cfg.family), "merge_caches") else None  # see span_mixers
    while t < T:
        written = None
        if writes_due(cfg, state):
            written = complete_chunks(ops, params, cfg, state, tokens[:, t], record, last, span, lowest)
        starts = C is not None and state["pos"] % C == 0
        n = T - t if C is None else min(T - t, C - state["pos"] % C)
        p = state["pos"]
        logits, cache = advance(ops, params, cfg, state, tokens[:, t:t + n], lowest, written)
        last = (logits, cache) if (starts and n == C) else None  # the chunk's one-piece forward
        if span is not None and last is not None:
            span.append((p, [c[1] for c in cache[1]]))
        if keep is not None:
            keep.append([c[1] for c in cache[1]])  # each block's c_mix of (c_n1, c_mix, c_n2, c_sec)
        out.append(logits)
        t += n
    return ops.np.concatenate(out, axis=1)


def forward(params, tokens, cfg: ModelConfig, state=None, *, ops: Ops = REFERENCE):
    """Logits (B, T, V) of tokens (B, T) and the state that continues the sequences.

    ``state=None`` starts fresh sequences; passing the returned state back continues them (the
    attention cache, the memory layers' states, the in-context CMS weights, and what the open
    level chunks' writes will re-run: their tokens, and per processing chunk the memory layers'
    states and CMS weights at its start), so one call equals any chain of calls. The input state
    is not modified.
    """
    params = check_params(params, cfg, ops.np)
    tokens = check_tokens(tokens, cfg, xp=ops.np)
    B = tokens.shape[0]
    state = init_state(params, cfg, B, ops=ops) if state is None else check_state(state, cfg, B)
    logits = run(ops, params, tokens, cfg, state)
    return logits, state


# ---------------------------------------------------------------------------------------------
# The outer loss and its gradient (first order in the in-context CMS increments)
# ---------------------------------------------------------------------------------------------


def cms_increments(params, tokens, cfg: ModelConfig, *, ops: Ops = REFERENCE) -> dict:
    """The in-context CMS increments of a fresh pass over tokens: the test hook that freezes them.

    Returns {"blocks.i.cms.l.W1": (B, G_l, D, Hm), ...}: for each in-context level, the
    cumulative increment in force during each of its chunks g over [0, T) (zero for g = 0), so
    the weights used there are theta_0 + increments[:, g]. Empty without in-context levels.
    """
    params = check_params(params, cfg, ops.np)
    tokens = check_tokens(tokens, cfg, xp=ops.np)
    return increments_of_pass(ops, params, tokens, cfg)


def weights_in_force(ops, params, tokens, cfg, keep=None, lowest=None) -> dict[str, list]:
    """The chunk-major pass over checked tokens from a fresh state (``keep``, ``lowest``: see ``run``): for each
    in-context level's weight, {"blocks.i.cms.l.W1": [(B, ...) per chunk g of the level over [0, T)]},
    the weights in force during chunk g (the initial state, then each write's result). A level in
    ``factored_levels`` gets a ``cms.Replay`` instead of the list: the same items, rebuilt from the
    initial state and the writes' factors."""
    state = init_state(params, cfg, tokens.shape[0], ops=ops)
    chunks, record = {}, {}
    factored = factored_levels(ops, cfg)
    for l in in_context_levels(cfg):
        for i in range(cfg.n_layers):
            for n in ("W1", "W2"):
                key, w0 = f"blocks.{i}.cms.{l}.{n}", state["cms"][i][f"{l}.{n}"]
                chunks[key] = len(cms.groups_for(cfg.cms_levels[l].period, 0, tokens.shape[1]))
                record[key] = ops.cms.Replay(w0, cfg.cms_levels[l].eta, ops.cms.write_factors) if l in factored else [w0]
    run(ops, params, tokens, cfg, state, record, keep, lowest)
    for key, arrays in record.items():
        assert len(arrays) == chunks[key], key  # one write at each of the level's chunk ends < T
    return record


def increments_of_pass(ops, params, tokens, cfg, keep=None, lowest=None):
    """``cms_increments`` of checked inputs (``keep``, ``lowest``: see ``run``): the cumulative sums of the
    writes' increments, each the difference of consecutive weights in force."""
    if cfg.cms_chunk is None:
        return {}
    record = weights_in_force(ops, params, tokens, cfg, keep, lowest)
    B, T = tokens.shape
    out = {}
    for key, arrays in record.items():
        cum = ops.np.zeros((B, len(arrays)) + params[key].shape, dtype=params[key].dtype)
        prev = None
        for g, w in enumerate(arrays):  # in order (a Replay rebuilds each item once)
            if g > 0:
                cum[:, g] = cum[:, g - 1] + (w - prev)
            prev = w
        out[key] = cum
    return out


def first_order_forward(ops, params, tokens, cfg, increments, mixers=None, in_force=None):
    """The whole sequence in one pass with the CMS weights theta_0 + increments (constants).

    ``in_force`` (``Ops.cms_group_lists``, from ``weights_in_force``): each in-context level's
    weights as the lists of the arrays in force per chunk, passed as they are instead of
    theta_0 + increments (the same weights up to the rounding of the increments' sums, without
    the (B, G, ...) arrays)."""
    B, T = tokens.shape
    cms_w, groups = None, [[(0, T)] for _ in cfg.cms_levels]
    if has_cms(cfg):
        live = in_context_levels(cfg)
        for l in live:
            groups[l] = cms.groups_for(cfg.cms_levels[l].period, 0, T)
        cms_w = []
        for i in range(cfg.n_layers):
            ws = []
            for l in range(len(cfg.cms_levels)):
                pair = []
                for n in ("W1", "W2"):
                    key = f"blocks.{i}.cms.{l}.{n}"
                    if in_force is not None and l in live:
                        pair.append(in_force[key])  # a list, or a cms.Replay (Ops.cms_factored_writes)
                        continue
                    w = ops.np.broadcast_to(params[key], (B, len(groups[l])) + params[key].shape)
                    if l in live:
                        inc = increments.get(key)
                        if inc is None or inc.shape != w.shape:
                            raise ValueError(f"increments[{key!r}] must have shape {w.shape}, got "
                                             f"{None if inc is None else inc.shape}")
                        w = w + inc
                    pair.append(w)
                ws.append(tuple(pair))
            cms_w.append(ws)
    return blocks.stack_forward(ops, params, cfg, tokens, 0, [None] * cfg.n_layers, [None] * cfg.n_layers,
                                cms_w, groups, mixers)


def loss_with_increments(params, tokens, cfg: ModelConfig, increments, *, ops: Ops = REFERENCE) -> float:
    """The mean next-token loss with the in-context CMS increments frozen at ``increments``
    (from ``cms_increments``): the function whose exact gradient ``loss_and_grads`` returns."""
    params = check_params(params, cfg, ops.np)
    tokens = check_tokens(tokens, cfg, min_T=2, xp=ops.np)
    logits = first_order_forward(ops, params, tokens, cfg, increments)[0]
    return ops.primitives.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])[0]


def loss_and_grads(params, tokens, cfg: ModelConfig, *, ops: Ops = REFERENCE):
    """Mean next-token cross-entropy on tokens[:, 1:] and its gradient (keys of ``params``).

    Exact for every family with ``cms_in_context=False``; with in-context CMS the increments are
    constants (first order, SPEC.md#cms), i.e. the exact gradient of ``loss_with_increments`` at
    ``cms_increments(params, tokens, cfg)``.
    """
    params = check_params(params, cfg, ops.np)
    tokens = check_tokens(tokens, cfg, min_T=2, xp=ops.np)
    return loss_and_grads_checked(ops, params, tokens, cfg)


def loss_and_grads_checked(ops, params, tokens, cfg):
    """``loss_and_grads`` of checked inputs.

    With ``Ops.reuse_layer_caches`` (and a layer module with ``merge_caches``), the whole-sequence
    pass re-uses the chunk-major pass's chain of layer caches, merged into one per block, instead
    of running the layers again: each block's layer sees the same input in both passes (block 0
    exactly; a higher block up to rounding, the CMS weights theta_0 + increments being the chunk
    pass's weights summed in another order; SPEC.md#fast-cpu).

    With ``Ops.lowest_layer_once`` (``contract.lowest_layer_once``), block 0's layer runs once, over
    the whole sequence (``blocks.lowest_layer``): the chunk-major pass takes slices of its output
    and the whole-sequence pass takes it with its cache."""
    P, xp = ops.primitives, ops.np
    module = None if has_attention(cfg) else ops.layer(cfg.family)
    keep = ([] if ops.reuse_layer_caches and hasattr(module, "merge_caches") and cfg.cms_chunk is not None
            and cfg.cms_chunk >= ops.reuse_min_chunk else None)
    increments = in_force = None
    low = blocks.lowest_layer(ops, params, cfg, tokens) if lowest_layer_once(ops, cfg) else None
    lowest = None if low is None else low[0]
    if ops.cms_group_lists and cfg.cms_chunk is not None:
        in_force = weights_in_force(ops, params, tokens, cfg, keep, lowest)
    else:
        increments = increments_of_pass(ops, params, tokens, cfg, keep, lowest)
    mixers = None
    if keep:
        mixers = [None if piece0 is None else module.merge_caches([piece[i] for piece in keep])
                  for i, piece0 in enumerate(keep[0])]  # (block 0's pieces carry no cache with ``lowest``)
    if low is not None:
        mixers = [low] + (mixers[1:] if mixers else [None] * (cfg.n_layers - 1))
    logits, cache, _, _ = first_order_forward(ops, params, tokens, cfg, increments, mixers, in_force)
    loss, c_ce = P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])
    dlogits = xp.zeros_like(logits)
    dlogits[:, :-1] = P.cross_entropy_backward(xp.asarray(1.0, dtype=logits.dtype), c_ce)
    wanted = ["sum"] * len(cfg.cms_levels) if ops.cms_grads_needed and has_cms(cfg) else None  # theta_0's gradient
    grads, dcms = blocks.stack_backward(ops, dlogits, cache, cfg, cms_wanted=wanted)
    if has_cms(cfg):
        for i in range(cfg.n_layers):
            for l in range(len(cfg.cms_levels)):
                for j, n in enumerate(("W1", "W2")):
                    grads[f"blocks.{i}.cms.{l}.{n}"] = dcms[i][l][j].sum(axis=(0, 1))  # theta_0 + const
    return float(loss), {k: xp.asarray(grads[k], dtype=params[k].dtype) for k in params}


def bind(ops: Ops) -> types.SimpleNamespace:
    """The model API computed with ``ops``: ``init_state``, ``forward``, ``loss_and_grads``,
    ``cms_increments``, ``loss_with_increments`` (the same signatures without ``ops``), plus the
    backend-independent ``init_params``, ``param_shapes``, ``param_counts``, ``state_size``."""
    return types.SimpleNamespace(
        ops=ops, init_params=init_params, param_shapes=param_shapes, param_counts=param_counts, state_size=state_size,
        **{f.__name__: functools.wraps(f)(functools.partial(f, ops=ops))
           for f in (init_state, forward, loss_and_grads, cms_increments, loss_with_increments)})


# ---------------------------------------------------------------------------------------------
# Sizes (``nested-learning info --model``)
# ---------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count per component, summed over blocks (keys without the block index)."""
    counts: dict[str, int] = {}
    for key, shape in param_shapes(cfg).items():
        parts = key.split(".")
        comp = ".".join(["blocks.*"] + parts[2:-1]) if parts[0] == "blocks" else ".".join(parts[:-1])
        counts[comp] = counts.get(comp, 0) + int(np.prod(shape))
    return counts


def state_size(cfg: ModelConfig) -> dict[str, int]:
    """Floats of state per sequence, at their largest (when writes are due at the longest in-context
    period's end): ``fixed`` (the in-context CMS weights, with the versions the open level chunks'
    re-runs need, ceil(C_max / C^(l)) per level; the memory layers' states, with one copy per
    distinct in-context period, kept at the start of each open level chunk (``open_level_starts``);
    the Titans hybrids' window cache), ``per_token`` (the attention cache grows by this
    much per token) and ``chunk_tokens`` (the tokens of the open level chunks kept, at most C_max)."""
    live = in_context_levels(cfg)
    longest = max((cfg.cms_levels[l].period for l in live), default=0)
    fixed = 0
    for l in live:
        versions = -(-longest // cfg.cms_levels[l].period)
        versions += l in meta_parents(cfg)  # nested CMS: the level's initial state, in context too
        fixed += 2 * cfg.d_model * cfg.cms_levels[l].hidden * cfg.n_layers * versions  # W1, W2
    if not has_attention(cfg):
        module = reference_layer(cfg.family)
        lcfg = layer_config(module, cfg)
        st = module.init_state(module.init_params(lcfg, np.random.default_rng(0)), lcfg, 1)
        mem = cfg.n_layers * sum(int(np.size(v)) for v in st.values() if isinstance(v, np.ndarray))
        periods = {cfg.cms_levels[l].period for l in live}
        fixed += mem * (1 + len(periods))  # + the copies at the open level chunks' starts (open_level_starts)
    if is_hybrid(cfg):  # the window's cache: the last window - 1 keys, and MAG's persistent keys (SW-Attn*,
        # SPEC.md#titans-mag; MAL's window has no persistent keys, SPEC.md#titans-mal)
        kept = cfg.attn_window - 1 + (cfg.mem_persistent if cfg.family == "titans-mag" else 0)
        if cfg.family == "titans-mac":  # the open segment's attention cache: [p, h_1, a_1, ... h_{C-1}, a_{C-1}],
            # and the memory's fast weights at the segment's start, which its retrieval reads (SPEC.md#titans-mac)
            kept = cfg.mem_persistent + 2 * (cfg.attn_window - 1)
            module = reference_layer(cfg.family)
            lcfg = layer_config(module, cfg)
            st = module.init_state(module.init_params(lcfg, np.random.default_rng(0)), lcfg, 1)
            fixed += cfg.n_layers * sum(int(np.size(st[n])) for n in module.weight_names(lcfg))
        fixed += 2 * cfg.d_model * cfg.n_layers * kept
    per_token = 2 * cfg.d_model * cfg.n_layers if has_attention(cfg) else 0
    return {"fixed": fixed, "per_token": per_token, "chunk_tokens": longest}
