"""The language model on the CPU: the reference model's API over the compiled primitives, CMS and layers.

Paper: §7-§8.3, Eqs. (70)-(74), (94)-(97), arXiv 2512.24695v1 (Titans: Titans Eqs. 9-18).
SPEC: SPEC.md#hope (families, processing order), SPEC.md#cms (first-order in-context CMS),
SPEC.md#fast-cpu (the port).

The same functions as ``reference/model.py`` with the same names, signatures, return structures
and dtypes: ``init_params``, ``init_state``, ``forward(params, tokens, cfg, state=None)``,
``loss_and_grads(params, tokens, cfg)``, ``cms_increments``, ``loss_with_increments``. The
parameter layout, initialisation, validation and state layout are the reference's own functions
(imported, not copied), so a state or a parameter dict moves freely between backends.

Symbols (as in reference/model.py; B batch, T tokens, D width, H heads, V vocabulary):

    tokens               tokens                 (B, T) ints in [0, V)
    embedding            params["embed.E"]      (V, D)
    theta^(f_l)_t        state["cms"][i]        (B, D, Hm), (B, Hm, D) per sequence, in context
    logits               logits                 (B, T, V)

Decisions (SPEC.md#fast-cpu):
    - the block, stack and chunk-major driver mirror the reference line for line, calling
      ``fast.cpu.primitives`` and ``fast.cpu.cms``; the sequence-memory layers come from
      ``fast.cpu.titans`` / ``fast.cpu.selfmod`` once those ports have landed and passed their
      equivalence tests (``PORTED_LAYERS``: titans is wired; hope's self-modifying layer is not
      yet); until then the family uses the reference's layer, an explicit fallback counted in
      ``primitives.FALLBACKS`` (``"model.<family>_layer"``);
    - the CMS writes' bookkeeping (which level chunks are open, the weights in force, Eq. 71 and
      forgetting what no open chunk needs) is the reference's own (``level_chunk_inputs``,
      ``complete_chunks``, ``writes_due``, imported); the port re-runs a level's chunk with its own stack;
    - one saving the reference does not make: when the processing chunk was forwarded in one piece
      by the same call, the write of the levels whose period is the processing chunk re-uses that
      forward's cache instead of re-running it (the inputs are identical: the same cache prefix,
      memory-layer states and CMS weights); slower levels re-run their own chunk (SPEC.md#cms). The
      re-runs need only the CMS weights' gradients, so they do not differentiate block 0's
      sequence mixer and the embedding (nothing they need lies below block 0's CMS);
    - in ``loss_and_grads`` of the hope family, each block's self-modifying layer sees the same input
      in the chunk-major pass and in the whole-sequence pass, so the latter re-uses the former's chain
      of layer caches merged into one (``fast.cpu.selfmod.merge_caches``) instead of running the
      layers a second time. Block 0's input is bitwise the same; a higher block's differs by rounding
      only (the whole-sequence pass's CMS weights theta_0 + sum of increments vs the chunk pass's
      weights updated in place: the same numbers summed in another order), so its layer's gradient
      is taken at the chunk pass's activations: measured at hope-small against running the layers
      again, gradients differ by 2.5e-16 (float64) and 1.7e-7 (float32) of the gradient's scale;
    - ``loss_and_grads`` splits the batch into ``NL_CPU_GROUPS`` groups run on the caller and worker
      threads or processes (``NL_CPU_THREADS``, ``NL_CPU_WORKERS``; see ``WORKERS`` below): the
      sequences are independent and the loss is their mean; the grouping fixes the rounding, the
      workers never change a result;
    - BLAS runs single-threaded inside the public functions (``NL_CPU_BLAS_THREADS``, default 1,
      applied with threadpoolctl): a step is hundreds of small products (16-token chunks), where
      OpenBLAS's spinning worker threads cost more than they give, catastrophically on a loaded
      machine (measured on the 2-core box under load: 23 s vs 1.3 s for one hope-attention-small
      step at batch 4 x 256). Results do not depend on the setting beyond rounding.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os

import numpy as np

from ...reference.config import ModelConfig
from ...reference.model import (  # noqa: F401  (re-exported: the shared, non-numeric part of the API)
    _check_params,
    _check_state,
    _check_tokens,
    _cms_weights,
    _copy,
    _has_attention,
    _has_cms,
    _in_context_levels,
    complete_chunks,
    init_params,
    init_state,
    level_chunk_inputs,
    param_counts,
    param_shapes,
    state_size,
    writes_due,
)
from . import blas, cms
from . import primitives as P

BLAS_THREADS = int(os.environ.get("NL_CPU_BLAS_THREADS", "1"))


def _blas_limited(fn):
    """Run ``fn`` with BLAS limited to ``BLAS_THREADS`` threads (``fast.cpu.blas.limited``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas.limited(BLAS_THREADS):
            return fn(*args, **kwargs)

    return wrapper


PORTED_LAYERS: dict[str, str | None] = {"titans": "titans", "hope": "selfmod",
                                        # not yet ported: reference/linear_layers.py, a counted fallback
                                        "linear-attention": None, "deltanet": None, "gated-deltanet": None}
"""family -> the fast.cpu module of its sequence-memory layer (None: the reference's layer, an
explicit fallback). Set once the port has landed and its equivalence tests pass."""


def _mem_layer(cfg: ModelConfig):
    """(module, layer config, forward, backward) of the titans / hope families' memory layer."""
    name = {"titans": "titans", "hope": "selfmod", "linear-attention": "linear_layers", "deltanet": "linear_layers",
            "gated-deltanet": "linear_layers"}.get(cfg.family)
    if name is None:
        raise ValueError(f"family {cfg.family!r} has no memory layer")
    if PORTED_LAYERS[cfg.family] is not None:
        module = importlib.import_module(f"{__package__}.{PORTED_LAYERS[cfg.family]}")
    else:  # explicit fallback: the reference's layer, until the fast port has landed
        P.FALLBACKS[f"model.{cfg.family}_layer"] = P.FALLBACKS.get(f"model.{cfg.family}_layer", 0) + 1
        module = importlib.import_module(f"nested_learning.reference.{name}")
    if cfg.family == "titans":
        lcfg = module.TitansConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk=cfg.mem_chunk,
                                   memory=cfg.mem_kind, hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max,
                                   eps=cfg.norm_eps)
        return module, lcfg, module.titans_forward, module.titans_backward
    if name == "linear_layers":  # SPEC.md#linear-families
        lcfg = module.LinearLayerConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, rule=module.FAMILY_RULES[cfg.family],
                                        chunk=cfg.mem_chunk, eps=cfg.norm_eps)
        return module, lcfg, module.forward, module.backward
    from ...reference.model import selfmod_switches  # the reference adapter's own mapping

    lcfg = module.SelfModConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk_memory=cfg.mem_chunk,
                                chunk_other=cfg.mem_chunk_other, memory=cfg.mem_kind,
                                hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max, eps=cfg.norm_eps,
                                **selfmod_switches(cfg))  # every switch is ported (SPEC.md#hope)
    return module, lcfg, module.forward, module.backward


# ---------------------------------------------------------------------------------------------
# Blocks over a segment of tokens at absolute positions [p0, p0 + n) (as reference/model.py)
# ---------------------------------------------------------------------------------------------


def _attn_forward(a, params, b, cfg, p0, past):
    Bn, n, D = a.shape
    H, dh = cfg.n_heads, cfg.d_head
    pos = np.arange(p0, p0 + n)
    heads, caches = {}, {}
    for name in ("q", "k", "v"):
        z, c_lin = P.linear_forward(a, params[b + "attn.W" + name])  # (B, n, D)
        z = z.reshape(Bn, n, H, dh).transpose(0, 2, 1, 3)  # (B, H, n, dh)
        c_rope = None
        if name != "v":
            z, c_rope = P.rope_forward(z, pos, cfg.rope_base)
        heads[name], caches[name] = z, (c_lin, c_rope)
    K, V = heads["k"], heads["v"]
    if past is not None:
        K = np.concatenate([past[0], K], axis=2)  # (B, H, p0 + n, dh)
        V = np.concatenate([past[1], V], axis=2)
    o, c_att = P.attention_forward(heads["q"], K, V, causal=True)  # (B, H, n, dh)  # Eq. (63)
    y, c_o = P.linear_forward(o.transpose(0, 2, 1, 3).reshape(Bn, n, D), params[b + "attn.Wo"])
    return y, (caches, c_att, c_o, n), (K, V)


def _attn_backward(dy, cache, b):
    caches, c_att, c_o, n = cache
    grads = {}
    do, grads[b + "attn.Wo"], _ = P.linear_backward(dy, c_o)
    Bn, _, D = dy.shape
    H = c_att[0].shape[1]
    do = do.reshape(Bn, n, H, D // H).transpose(0, 2, 1, 3)  # (B, H, n, dh)
    dq, dK, dV = P.attention_backward(do, c_att)
    dheads = {"q": dq, "k": dK[:, :, -n:], "v": dV[:, :, -n:]}  # the cache is a constant
    da = 0
    for name in ("q", "k", "v"):
        c_lin, c_rope = caches[name]
        dz = dheads[name] if c_rope is None else P.rope_backward(dheads[name], c_rope)
        dz = dz.transpose(0, 2, 1, 3).reshape(Bn, n, D)
        dx, grads[b + "attn.W" + name], _ = P.linear_backward(dz, c_lin)
        da = da + dx
    return da, grads


def _block_forward(x, params, i, cfg, p0, past, mem_state, cms_w, cms_groups, mixer=None):
    """``mixer``: (o, cache) of this block's sequence-memory layer already computed on the same input
    (the whole-sequence pass re-uses the chunk-major pass's lowest block; see ``loss_and_grads``)."""
    b = f"blocks.{i}."
    a, c_n1 = P.rmsnorm_forward(x, params[b + "norm1.g"], cfg.norm_eps)  # (B, n, D)
    new_past = new_mem = None
    if mixer is not None:
        o, c_mix = mixer
    elif _has_attention(cfg):
        o, c_mix, new_past = _attn_forward(a, params, b, cfg, p0, past)
    else:
        _, lcfg, fwd, _ = _mem_layer(cfg)
        lp = {k[len(b) + 4:]: v for k, v in params.items() if k.startswith(b + "mem.")}
        o, c_mix, new_mem = fwd(a, lp, lcfg, mem_state)
    h = x + o  # (B, n, D)
    u, c_n2 = P.rmsnorm_forward(h, params[b + "norm2.g"], cfg.norm_eps)
    if _has_cms(cfg):
        c, c_sec = cms.forward(u, cms_w, cms_groups, cfg.cms_variant, cfg.cms_activation,
                               params.get(b + "cms.agg"))  # Eqs. (70)/(74), (97)
        y = h + (c - u)
    else:
        m, c_sec = P.swiglu_forward(u, params[b + "mlp.W_gate"], params[b + "mlp.W_up"], params[b + "mlp.W_down"])
        y = h + m
    return y, (c_n1, c_mix, c_n2, c_sec), new_past, new_mem


def _block_backward(dy, cache, i, cfg, cms_only=False):
    """``cms_only``: return (None, {}, dcms) right after the CMS backward (the caller needs no
    gradient below this block's CMS: the CMS-write pass at the lowest block)."""
    b = f"blocks.{i}."
    c_n1, c_mix, c_n2, c_sec = cache
    grads, dcms = {}, None
    if _has_cms(cfg):
        du, dcms, dagg = cms.backward(dy, c_sec)
        if cms_only:
            return None, {}, dcms
        du = du - dy
        if dagg is not None:
            grads[b + "cms.agg"] = dagg
    else:
        du, grads[b + "mlp.W_gate"], grads[b + "mlp.W_up"], grads[b + "mlp.W_down"] = P.swiglu_backward(dy, c_sec)
    dh, grads[b + "norm2.g"] = P.rmsnorm_backward(du, c_n2)
    dh = dh + dy
    if _has_attention(cfg):
        da, g = _attn_backward(dh, c_mix, b)
    else:
        _, _, _, bwd = _mem_layer(cfg)
        da, g, _ = bwd(dh, c_mix)
        g = {b + "mem." + k: v for k, v in g.items()}
    grads.update(g)
    dx, grads[b + "norm1.g"] = P.rmsnorm_backward(da, c_n1)
    return dx + dh, grads, dcms


def _stack_forward(params, cfg, tokens, p0, past, mem, cms_w, cms_groups, mixers=None):
    x, c_emb = P.embedding_forward(tokens, params["embed.E"])  # (B, n, D)
    caches, new_past, new_mem = [], [], []
    for i in range(cfg.n_layers):
        x, c, np_i, nm_i = _block_forward(x, params, i, cfg, p0, past[i], mem[i],
                                          cms_w[i] if cms_w else None, cms_groups, mixers[i] if mixers else None)
        caches.append(c)
        new_past.append(np_i)
        new_mem.append(nm_i)
    xf, c_fn = P.rmsnorm_forward(x, params["final_norm.g"], cfg.norm_eps)
    logits, c_head = P.linear_forward(xf, params["head.W"])  # (B, n, V)
    return logits, (c_emb, caches, c_fn, c_head), new_past, new_mem


def _stack_backward(dlogits, cache, cfg, cms_only=False):
    """``cms_only`` (the CMS-write pass, which uses only the CMS weights' gradients): block 0's
    mixer, norm and the embedding are not differentiated, since no CMS weight lies below them;
    the CMS gradients are the same numbers either way."""
    c_emb, caches, c_fn, c_head = cache
    grads = {}
    dxf, grads["head.W"], _ = P.linear_backward(dlogits, c_head)
    dx, grads["final_norm.g"] = P.rmsnorm_backward(dxf, c_fn)
    dcms = [None] * cfg.n_layers
    for i in reversed(range(cfg.n_layers)):
        dx, g, dcms[i] = _block_backward(dx, caches[i], i, cfg, cms_only=cms_only and i == 0)
        grads.update(g)
    if dx is not None:
        grads["embed.E"] = P.embedding_backward(dx, c_emb)
    return grads, dcms


# ---------------------------------------------------------------------------------------------
# The chunk-major forward (SPEC.md#hope: the processing order)
# ---------------------------------------------------------------------------------------------


def _advance(params, cfg, state, seg):
    """Forward a segment inside one processing chunk; update the state in place (the reference's
    ``_advance``, keeping the chunk-start memory states by reference: no layer writes a state in
    place). Returns (logits, the stack cache)."""
    n = seg.shape[1]
    if cfg.cms_chunk is not None and state["pos"] % cfg.cms_chunk == 0:
        state["history"].append({"start": state["pos"], "mem": state["mem"],
                                 "cms": [dict(fast) for fast in state["cms"]]})
    groups = [[(0, n)] for _ in cfg.cms_levels]
    logits, cache, new_past, new_mem = _stack_forward(params, cfg, seg, state["pos"], state["past"], state["mem"],
                                                      _cms_weights(params, cfg, state), groups)
    state["past"], state["mem"] = new_past, new_mem
    state["pos"] += n
    if cfg.cms_chunk is not None:
        state["window"] = np.concatenate([state["window"], seg], axis=1)
    return logits, cache


def _level_chunk_gradient(params, cfg, state, start, next_token, fwd=None):
    """reference/model.py::_level_chunk_gradient, differentiating only down to block 0's CMS.
    ``fwd``: (logits, stack cache) of the chunk [start, pos) when this call forwarded it in one
    piece (the same inputs: it is not re-run then)."""
    if fwd is None:
        X, targets, past, mem, cms_w, groups = level_chunk_inputs(params, cfg, state, start, next_token)
        logits, cache, _, _ = _stack_forward(params, cfg, X, start, past, mem, cms_w, groups)
    else:
        logits, cache = fwd
        X = state["window"][:, start - state["pos"]:]
        targets = np.concatenate([X[:, 1:], next_token[:, None]], axis=1)
    _, c_ce = P.cross_entropy_forward(logits, targets)
    dlogits = P.cross_entropy_backward(np.asarray(float(X.size), dtype=logits.dtype), c_ce)  # sum, not mean
    return _stack_backward(dlogits, cache, cfg, cms_only=True)[1]


def _complete_chunks(params, cfg, state, next_token, record, fwd=None):
    """The CMS writes due now (reference/model.py::complete_chunks) with this port's chunk gradient.
    ``fwd``: (logits, stack cache) of the last processing chunk when it ran in one piece in this
    call: the re-run of the levels whose period is the processing chunk."""
    def gradient(params, cfg, state, start, next_token):
        reuse = fwd if state["pos"] - start == cfg.cms_chunk else None
        return _level_chunk_gradient(params, cfg, state, start, next_token, reuse)

    complete_chunks(params, cfg, state, next_token, record, gradient)


def _run(params, tokens, cfg, state, record=None, keep=None):
    """``keep``: a list that receives, per forwarded piece, each block's sequence-memory layer cache."""
    T = tokens.shape[1]
    C = cfg.cms_chunk
    out, t, whole = [], 0, None
    while t < T:
        if writes_due(cfg, state):
            _complete_chunks(params, cfg, state, tokens[:, t], record, whole)
        starts = C is not None and state["pos"] % C == 0
        n = T - t if C is None else min(T - t, C - state["pos"] % C)
        logits, cache = _advance(params, cfg, state, tokens[:, t:t + n])
        whole = (logits, cache) if (starts and n == C) else None  # the chunk's one-piece forward
        if keep is not None:
            keep.append([c[1] for c in cache[1]])  # each block's c_mix of (c_n1, c_mix, c_n2, c_sec)
        out.append(logits)
        t += n
    return np.concatenate(out, axis=1)


@_blas_limited
def forward(params, tokens, cfg: ModelConfig, state=None):
    """Logits (B, T, V) of tokens (B, T) and the state that continues the sequences (as the
    reference: one call equals any chain of calls; the input state is not modified)."""
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg)
    state = init_state(params, cfg, tokens.shape[0]) if state is None else _check_state(state, cfg, tokens.shape[0])
    logits = _run(params, tokens, cfg, state)
    return logits, state


# ---------------------------------------------------------------------------------------------
# The outer loss and its gradient (first order in the in-context CMS increments)
# ---------------------------------------------------------------------------------------------


@_blas_limited
def cms_increments(params, tokens, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The in-context CMS increments of a fresh pass over tokens (reference/model.py)."""
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg)
    return _cms_increments(params, tokens, cfg)


def _cms_increments(params, tokens, cfg, keep=None):
    if cfg.cms_chunk is None:
        return {}
    record: dict[str, list] = {}
    _run(params, tokens, cfg, init_state(params, cfg, tokens.shape[0]), record, keep)
    B, T = tokens.shape
    out = {}
    for i in range(cfg.n_layers):
        for l in _in_context_levels(cfg):
            G = len(cms.groups_for(cfg.cms_levels[l].period, 0, T))
            for n in ("W1", "W2"):
                key = f"blocks.{i}.cms.{l}.{n}"
                deltas = record.get(key, [])
                cum = np.zeros((B, G) + params[key].shape, dtype=params[key].dtype)
                for g in range(1, G):
                    cum[:, g] = cum[:, g - 1] + deltas[g - 1]
                out[key] = cum
    return out


def _first_order_forward(params, tokens, cfg, increments, mixers=None):
    """The whole sequence in one pass with the CMS weights theta_0 + increments (constants)."""
    B, T = tokens.shape
    cms_w, groups = None, [[(0, T)] for _ in cfg.cms_levels]
    if _has_cms(cfg):
        live = _in_context_levels(cfg)
        for l in live:
            groups[l] = cms.groups_for(cfg.cms_levels[l].period, 0, T)
        cms_w = []
        for i in range(cfg.n_layers):
            ws = []
            for l in range(len(cfg.cms_levels)):
                pair = []
                for n in ("W1", "W2"):
                    key = f"blocks.{i}.cms.{l}.{n}"
                    w = np.broadcast_to(params[key], (B, len(groups[l])) + params[key].shape)
                    if l in live:
                        inc = increments.get(key)
                        if inc is None or inc.shape != w.shape:
                            raise ValueError(f"increments[{key!r}] must have shape {w.shape}, got "
                                             f"{None if inc is None else inc.shape}")
                        w = w + inc
                    pair.append(w)
                ws.append(tuple(pair))
            cms_w.append(ws)
    return _stack_forward(params, cfg, tokens, 0, [None] * cfg.n_layers, [None] * cfg.n_layers, cms_w, groups,
                          mixers)


@_blas_limited
def loss_with_increments(params, tokens, cfg: ModelConfig, increments) -> float:
    """The mean next-token loss with the in-context CMS increments frozen at ``increments``."""
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg, min_T=2)
    logits = _first_order_forward(params, tokens, cfg, increments)[0]
    return P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])[0]


# ---------------------------------------------------------------------------------------------
# The batch split over cores (SPEC.md#fast-cpu: groups and threads)
# ---------------------------------------------------------------------------------------------

def _env_setting(name: str, default: str, allowed=None, minimum=None):
    """The environment variable ``name`` (``default`` when unset), checked: an int >= ``minimum`` or
    one of ``allowed``; anything else is a ValueError that names the variable and the choices."""
    raw = os.environ.get(name, default)
    if allowed is not None:
        if raw not in allowed:
            raise ValueError(f"{name}={raw!r}: must be one of {', '.join(allowed)}")
        return raw
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={raw!r}: must be an integer >= {minimum}")
    return value


GROUPS = _env_setting("NL_CPU_GROUPS", "2", minimum=1)
"""``loss_and_grads`` splits the batch into this many contiguous groups of sequences (at most B; sizes
differ by at most one) and combines their results in a fixed order. The grouping, not the thread
count, decides the rounding, so a result is the same on any machine with the same setting."""
THREADS = _env_setting("NL_CPU_THREADS", "0", minimum=0)
"""Workers that run the groups, the calling thread included (0: one per group, at most the cores
this process may use; 1: the groups run one after the other). Never changes a result."""
WORKERS = _env_setting("NL_CPU_WORKERS", "thread", allowed=("thread", "process"))
"""What runs the groups other than the caller's first: ``"thread"`` (threads of this process: the
compiled kernels and BLAS release the GIL, the Python glue does not) or ``"process"`` (worker
processes started once from a forkserver that has imported this module; the parameters and
gradients cross a pipe each call, ~10 ms for 4 MB each way). Never changes a result (the same code
on the same numbers; tested bitwise). Processes win where the step is glue-heavy (the hope
family): measured on the 2-core machine, batch 4 x 256 float32, tokens/s serial / threads /
processes: hope-small 830 / 1,046 / 1,460, titans-small 5,406 / 7,301 / 8,289. The command line
(``nested-learning``, ``python -m nested_learning``) uses processes unless ``NL_CPU_WORKERS`` says
otherwise; the library default is threads, because a worker process imports the parent's main
script (multiprocessing's rule), which a script without an ``if __name__ == "__main__":`` guard
does not survive."""
_POOLS: dict = {}  # (kind, n) -> executor


@atexit.register
def _close_pools():
    """Shut the worker pools down while the interpreter is whole (a process pool collected during
    the interpreter's teardown prints an ignored AttributeError from concurrent.futures)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=True)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def batch_groups(B: int) -> list[slice]:
    """The contiguous groups of a batch of B sequences: ``min(GROUPS, B)`` slices whose sizes differ
    by at most one, the larger first."""
    g = max(1, min(GROUPS, B))
    sizes = [B // g + (1 if i < B % g else 0) for i in range(g)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(starts[i]), int(starts[i + 1])) for i in range(g)]


def worker_threads(n_groups: int) -> int:
    """Workers (the caller included) that run ``n_groups`` groups now: ``THREADS``, or one per
    group up to the usable cores."""
    want = THREADS if THREADS > 0 else usable_cores()
    return max(1, min(n_groups, want))


def _group_step(params, tokens, cfg):
    """One group's ``loss_and_grads`` (checked inputs), in a worker thread or process."""
    with blas.limited(BLAS_THREADS):
        return _loss_and_grads(params, tokens, cfg)


def _die_with_parent(parent_pid: int) -> None:
    """Worker-process initializer: end this worker as soon as ``parent_pid`` (the process that made
    the pool) exits, however it exits (SIGKILL included; SPEC.md#run-directories). A forkserver
    worker's OS parent is the forkserver, which lives as long as its workers do, and the workers
    hold their own queue's pipe open, so neither a parent-death signal nor an EOF would come: a
    daemon thread waits on a pidfd of ``parent_pid`` (readable when it exits; polled every 0.5 s
    where pidfds are missing) and ends the process."""
    import threading

    def watch():
        import select
        import time

        try:
            fd = os.pidfd_open(parent_pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
            os._exit(1)
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:  # the parent died before this worker started
        os._exit(1)
    threading.Thread(target=watch, name="nl-cpu-parent-watch", daemon=True).start()


def _pool(kind: str, n: int):
    """The executor of ``n`` workers of ``kind``, kept between calls; one per (kind, n), so that
    switching settings back and forth does not restart worker processes."""
    key = (kind, n)
    if key in _POOLS:
        return _POOLS[key]
    if kind == "thread":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nl-cpu")
    elif kind == "process":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload([__name__])  # the workers start with the port imported
        pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_die_with_parent,
                                   initargs=(os.getpid(),))  # the workers end with this process
    else:
        raise ValueError(f"NL_CPU_WORKERS must be 'thread' or 'process', got {kind!r}")
    _POOLS[key] = pool
    return pool


def _map_groups(params, tokens, cfg, groups):
    """[_loss_and_grads on each group], in the groups' order: the first in the calling thread, the
    others on ``worker_threads - 1`` workers of kind ``WORKERS``. An exception in any group is
    raised here; a worker process that died is reported and its pool re-made on the next call."""
    n = worker_threads(len(groups))
    if n == 1:
        return [_loss_and_grads(params, tokens[g], cfg) for g in groups]
    pool = _pool(WORKERS, n - 1)
    futures = [pool.submit(_group_step, params, tokens[g], cfg) for g in groups[1:]]
    try:
        first = _loss_and_grads(params, tokens[groups[0]], cfg)
        return [first] + [f.result() for f in futures]
    except Exception as exc:
        from concurrent.futures.process import BrokenProcessPool

        for f in futures:
            f.cancel()
        if isinstance(exc, BrokenProcessPool):
            _POOLS.pop((WORKERS, n - 1), None)
            pool.shutdown(wait=True)  # the dead pool's manager thread ends before we go on
            raise RuntimeError(f"a CPU-port worker process died ({exc}); the next call starts new ones. "
                               "NL_CPU_WORKERS=thread runs the groups in threads instead") from exc
        raise


@_blas_limited
def loss_and_grads(params, tokens, cfg: ModelConfig):
    """Mean next-token cross-entropy on tokens[:, 1:] and its gradient (keys of ``params``), the
    same function as reference/model.py::loss_and_grads.

    The sequences of a batch are independent (per-sequence fast state, in-context CMS included) and
    the loss is a mean over them, so the batch is split into ``batch_groups`` computed by
    ``worker_threads`` workers (``WORKERS``): loss = sum_g (B_g / B) loss_g, and the same for every gradient,
    summed in the groups' order."""
    params = _check_params(params, cfg)
    tokens = _check_tokens(tokens, cfg, min_T=2)
    B = tokens.shape[0]
    groups = batch_groups(B)
    if len(groups) == 1:
        return _loss_and_grads(params, tokens, cfg)
    results = _map_groups(params, tokens, cfg, groups)
    weights = [(g.stop - g.start) / B for g in groups]
    loss = sum(w * r[0] for w, r in zip(weights, results, strict=True))
    grads = {}
    for k in params:
        acc = weights[0] * results[0][1][k]
        for w, r in zip(weights[1:], results[1:], strict=True):
            acc = acc + w * r[1][k]
        grads[k] = np.asarray(acc, dtype=params[k].dtype)
    return float(loss), grads


def _loss_and_grads(params, tokens, cfg):
    """``loss_and_grads`` of checked inputs, in the calling thread."""
    # Each block's sequence-memory layer sees the same input in the chunk-major pass and in the
    # whole-sequence pass (block 0 exactly: nothing below it depends on the CMS increments; a higher
    # block up to rounding: the whole-sequence pass's CMS weights theta_0 + increments are the chunk
    # pass's in-context weights summed in another order), so the second pass re-uses the first's chain
    # of layer caches, merged into one per block (fast.cpu.selfmod.merge_caches; a chain of calls
    # equals one call) instead of running the layers again.
    keep = [] if cfg.family == "hope" and PORTED_LAYERS["hope"] == "selfmod" else None
    increments = _cms_increments(params, tokens, cfg, keep)
    mixers = None
    if keep:
        module = _mem_layer(cfg)[0]
        mixers = [module.merge_caches([piece[i] for piece in keep]) for i in range(len(keep[0]))]
    logits, cache, _, _ = _first_order_forward(params, tokens, cfg, increments, mixers)
    loss, c_ce = P.cross_entropy_forward(logits[:, :-1], tokens[:, 1:])
    dlogits = np.zeros_like(logits)
    dlogits[:, :-1] = P.cross_entropy_backward(np.asarray(1.0, dtype=logits.dtype), c_ce)
    grads, dcms = _stack_backward(dlogits, cache, cfg)
    if _has_cms(cfg):
        for i in range(cfg.n_layers):
            for l in range(len(cfg.cms_levels)):
                for j, n in enumerate(("W1", "W2")):
                    grads[f"blocks.{i}.cms.{l}.{n}"] = dcms[i][l][j].sum(axis=(0, 1))  # theta_0 + const
    return float(loss), {k: np.asarray(grads[k], dtype=params[k].dtype) for k in params}


__all__ = ["GROUPS", "PORTED_LAYERS", "THREADS", "WORKERS", "batch_groups", "cms_increments", "forward", "init_params",
           "init_state", "loss_and_grads", "loss_with_increments", "param_counts", "param_shapes", "state_size", "usable_cores", "worker_threads"]
