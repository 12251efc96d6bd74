"""The contract between the reference model and the ports: what a backend supplies, what it may use.

SPEC: SPEC.md#backends (the one model driver and its ops), SPEC.md#hope (families, parameters,
state), SPEC.md#public-api (the argument checks and their errors).

There is one model driver (``reference/blocks.py`` for a segment of tokens, ``reference/model.py``
for the chunk-major loop, the CMS writes and the outer gradient). It computes with the array code
of a backend, an ``Ops``: the reference passes NumPy and its own modules; the CPU port passes its
compiled modules (``fast/cpu/model.py``); the GPU port passes the reference's modules run over
CuPy (``fast/gpu/model.py``). Everything else a port needs from the reference is a public name
here: the family predicates, the translation of a ``ModelConfig`` into a layer's config, the
parameter shapes, the argument checks, the state's layout. No file under ``fast/`` imports an
underscore name from ``reference/`` (tests/reference/test_contract.py greps for it).

CuPy-safety (the rule every reference module keeps, checked by tests/reference/test_contract.py): a module
whose source the GPU port executes over CuPy (``fast/gpu/namespace.py`` ``MODULES``) imports NumPy
as ``np`` and calls array functions only through that name, so rebinding it moves every function
body onto the device. This module and the driver take the namespace as an argument instead
(``Ops.np``; the checks below take ``xp``).
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable

import numpy as np

from . import cms
from .config import HYBRID_FAMILIES, LINEAR_FAMILIES, SELFMOD_SWITCHES, ModelConfig

# ---------------------------------------------------------------------------------------------
# What a backend supplies
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ops:
    """The array code the model driver computes with (SPEC.md#backends).

    ``np`` is the array namespace; ``primitives`` and ``cms`` are modules with the functions of
    ``reference/primitives.py`` and ``reference/cms.py`` (same names, arguments, caches);
    ``layer(family)`` is the module of a family's sequence-memory layer (``titans``, ``selfmod``
    or ``linear_layers``, or a port of one with the same functions).

    The switches are savings a port may make; each computes the same numbers as the plain driver
    (the ports' property tests prove it, SPEC.md#fast-cpu):
        - ``reuse_chunk_forward``: a level whose period is the processing chunk takes its write's
          gradient from the processing chunk's own forward when that ran in one piece (the same
          inputs as the re-run), instead of re-running it;
        - ``cms_grads_only``: a write's re-run stops its backward at block 0's CMS (nothing it
          needs lies below);
        - ``reuse_layer_caches``: ``loss_and_grads`` re-uses the chunk-major pass's layer caches,
          merged by ``layer(family).merge_caches``, in the whole-sequence pass;
        - ``reuse_span_layers``: a level whose period spans several processing chunks takes its
          write's re-run of the sequence-memory layers from those chunks' own layer caches, merged
          by ``layer(family).merge_caches``, when every one of them ran in one piece in this call
          (the same inputs; the rest of the stack is re-run);
        - ``copy_history``: a processing chunk's record keeps a copy of the memory layers' states
          (False: a reference, for layers that never write a state in place);
        - ``cms_grads_needed``: the CMS backward forms only the weight gradients the driver uses
          (``cms.backward``'s ``wanted``): a write's re-run only the due levels' (and, nested, their
          children's), the whole-sequence pass each level's sum over sequences and groups;
        - ``cms_group_lists``: per-group CMS weights go to ``cms`` as lists of the (B, ...) arrays in
          force per group, not stacked into (B, G, ...) arrays: a write's re-run passes the history's
          arrays, the whole-sequence pass the weights in force per chunk (``model.weights_in_force``)
          instead of theta_0 + increments (equal up to the rounding of the increments' sums);
        - ``reuse_min_chunk``: ``reuse_layer_caches`` and ``reuse_span_layers`` apply only where the
          processing chunk has at least this many tokens (a merged chain of shorter pieces can cost
          more than the re-run it saves, and it keeps every piece's states);
        - ``cms_factored_writes`` (with ``cms_grads_needed``): a write of a level in ``factored_levels``
          takes its chunk's gradient as per-token ``cms.Factors`` (``wanted`` ``factors``) and applies it with
          ``cms.write_factors``; the whole-sequence pass's record keeps the level's first weights
          and those factors (``cms.Replay``) instead of the weights in force per chunk, and rebuilds
          them in order (the same arrays);
        - ``lowest_layer_once`` (with ``cms_grads_only``): ``loss_and_grads`` runs block 0's
          sequence-memory layer once over the whole sequence (``blocks.lowest_layer``; its input,
          the embedding, does not depend on the CMS weights) and hands slices of its output to the
          chunk-major pass's processing chunks and re-runs, and the whole of it, with its cache,
          to the whole-sequence pass (``lowest_layer_once``), instead of a layer call per chunk.
    """

    name: str
    np: types.ModuleType
    primitives: types.ModuleType
    cms: types.ModuleType
    layer: Callable[[str], types.ModuleType]
    reuse_chunk_forward: bool = False
    cms_grads_only: bool = False
    reuse_layer_caches: bool = False
    reuse_span_layers: bool = False
    copy_history: bool = True
    cms_grads_needed: bool = False
    cms_group_lists: bool = False
    reuse_min_chunk: int = 1
    cms_factored_writes: bool = False
    lowest_layer_once: bool = False


LAYER_MODULES: dict[str, str] = {"titans": "titans", "hope": "selfmod", "linear-attention": "linear_layers",
                                 "deltanet": "linear_layers", "gated-deltanet": "linear_layers",
                                 "dgd": "linear_layers", "titans-mag": "titans", "titans-mal": "titans",
                                 "titans-mac": "titans"}
"""family -> the reference module of its sequence-memory layer (the attention families have none)."""


def reference_layer(family: str) -> types.ModuleType:
    """The reference's module of ``family``'s sequence-memory layer (imported on first use)."""
    if family not in LAYER_MODULES:
        raise ValueError(f"family {family!r} has no memory layer")
    return importlib.import_module(f"{__package__}.{LAYER_MODULES[family]}")


# ---------------------------------------------------------------------------------------------
# Families and the translation of a ModelConfig
# ---------------------------------------------------------------------------------------------


def has_cms(cfg: ModelConfig) -> bool:
    """Whether the blocks' second sublayer is a CMS chain (hope, hope-attention)."""
    return cfg.family in ("hope", "hope-attention")


def has_attention(cfg: ModelConfig) -> bool:
    """Whether the blocks' sequence mixer is softmax attention (transformer, hope-attention)."""
    return cfg.family in ("transformer", "hope-attention")


def is_hybrid(cfg: ModelConfig) -> bool:
    """Whether the blocks' mixer is a Titans hybrid (titans-mag: sliding-window attention gated by
    the Titans memory layer, SPEC.md#titans-mag; titans-mal: the Titans layer, then sliding-window
    attention over its output, SPEC.md#titans-mal; titans-mac: attention over the memory's retrieval
    per segment, the memory written with its output, SPEC.md#titans-mac): attention parameters and a
    memory layer both."""
    return cfg.family in HYBRID_FAMILIES


def has_memory_layer(cfg: ModelConfig) -> bool:
    """Whether the blocks hold a sequence-memory layer (``blocks.i.mem.*``, a state in ``state["mem"]``)."""
    return not has_attention(cfg)


def has_kv_cache(cfg: ModelConfig) -> bool:
    """Whether the blocks hold attention parameters and a KV cache (``blocks.i.attn.*``, ``state["past"]``)."""
    return has_attention(cfg) or is_hybrid(cfg)


def in_context_levels(cfg: ModelConfig) -> list[int]:
    """The CMS levels written in context (a period, and ``cms_in_context``), in order."""
    if not has_cms(cfg) or not cfg.cms_in_context:
        return []
    return [l for l, lv in enumerate(cfg.cms_levels) if lv.period is not None]


def factored_levels(ops: Ops, cfg: ModelConfig) -> set[int]:
    """The in-context levels whose writes ``Ops.cms_factored_writes`` keeps as factors: those whose
    chunk's factors, C^(l) (D + Hm) numbers per sequence, are fewer than the D x Hm weights they
    replace, outside nested CMS (Eq. 72 sums a child's per-group gradients; SPEC.md#cms "Factored
    writes"). Empty unless ``cms_grads_needed`` is on too: it is the ``wanted`` that asks for factors."""
    if not (ops.cms_factored_writes and ops.cms_grads_needed):
        return set()
    nested = set(meta_parents(cfg)) | set(meta_parents(cfg).values())
    return {l for l in in_context_levels(cfg) if l not in nested
            and cfg.cms_levels[l].period * (cfg.d_model + cfg.cms_levels[l].hidden) < cfg.d_model * cfg.cms_levels[l].hidden}


def lowest_layer_once(ops: Ops, cfg: ModelConfig) -> bool:
    """Whether ``loss_and_grads`` runs block 0's sequence-memory layer once (``Ops.lowest_layer_once``):
    a model with in-context CMS (a chunk-major pass) whose blocks mix with a plain memory layer
    (not attention, not a Titans hybrid: their mixers also read the attention cache). It needs
    ``cms_grads_only``: a write's re-run then never differentiates block 0's layer, so the slices
    it gets carry no cache."""
    return (ops.lowest_layer_once and ops.cms_grads_only and cfg.cms_chunk is not None
            and not has_attention(cfg) and not is_hybrid(cfg))


def meta_parents(cfg: ModelConfig) -> dict[int, int]:
    """Nested CMS (Eq. 72, SPEC.md#cms): {level: the level that meta-learns its initial state} for
    ``cfg.cms_nested``; the parent of an in-context level is the in-context level with the next
    longer period (the first in config order among equals). Empty without nesting; the slowest
    in-context level has no parent (the outer level learns its initial state)."""
    if not cfg.cms_nested:
        return {}
    live = in_context_levels(cfg)
    out = {}
    for l in live:
        longer = [m for m in live if cfg.cms_levels[m].period > cfg.cms_levels[l].period]
        if longer:
            shortest = min(cfg.cms_levels[m].period for m in longer)
            out[l] = next(m for m in longer if cfg.cms_levels[m].period == shortest)
    return out


def selfmod_switches(cfg: ModelConfig) -> dict[str, bool]:
    """The ablation switches of ``cfg`` as SelfModConfig keywords (``mem_momentum`` -> ``momentum``,
    ...; SPEC.md#hope "Ablation switches")."""
    return {key.removeprefix("mem_"): getattr(cfg, key) for key in SELFMOD_SWITCHES}


def layer_config(module: types.ModuleType, cfg: ModelConfig):
    """``cfg``'s sequence-memory layer as the config of ``module`` (its reference module or a port
    of it: they share the config classes)."""
    if cfg.family in ("titans", *HYBRID_FAMILIES):
        return module.TitansConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk=cfg.mem_chunk,
                                   memory=cfg.mem_kind, hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max,
                                   layernorm=cfg.mem_layernorm, eps=cfg.norm_eps)
    if cfg.family in LINEAR_FAMILIES:  # SPEC.md#linear-families
        return module.LinearLayerConfig(d_model=cfg.d_model, n_heads=cfg.n_heads,
                                        rule=module.FAMILY_RULES[cfg.family], chunk=cfg.mem_chunk,
                                        eps=cfg.norm_eps)
    if cfg.family == "hope":
        return module.SelfModConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, chunk_memory=cfg.mem_chunk,
                                    chunk_other=cfg.mem_chunk_other, memory=cfg.mem_kind,
                                    hidden=cfg.mem_hidden, eta_max=cfg.mem_eta_max, eps=cfg.norm_eps,
                                    **selfmod_switches(cfg))
    raise ValueError(f"family {cfg.family!r} has no memory layer")


@dataclasses.dataclass(frozen=True)
class MemoryLayer:
    """A block's sequence-memory layer: its module, its config and its forward/backward pair
    (``forward(x, params, cfg, state) -> (y, cache, state)``, ``backward(dy, cache) -> (dx, grads, dstate)``)."""

    module: types.ModuleType
    cfg: object
    forward: Callable
    backward: Callable


def memory_layer(module: types.ModuleType, cfg: ModelConfig) -> MemoryLayer:
    """``cfg``'s sequence-memory layer computed by ``module``."""
    lcfg = layer_config(module, cfg)
    if cfg.family in ("titans", *HYBRID_FAMILIES):
        return MemoryLayer(module, lcfg, module.titans_forward, module.titans_backward)
    return MemoryLayer(module, lcfg, module.forward, module.backward)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every outer parameter and its shape, in a fixed order; gradients use the same keys
    (SPEC.md#hope: the parameter layout, the same on every backend)."""
    D, V, F = cfg.d_model, cfg.vocab_size, cfg.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {"embed.E": (V, D)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        shapes[b + "norm1.g"] = (D,)
        if has_kv_cache(cfg):
            for n in ("Wq", "Wk", "Wv", "Wo"):
                shapes[b + "attn." + n] = (D, D)
        if has_memory_layer(cfg):
            module = reference_layer(cfg.family)
            for n, s in module.param_shapes(layer_config(module, cfg)).items():
                shapes[b + "mem." + n] = tuple(s)
        if cfg.family == "titans-mag":  # the gate (SPEC.md#titans-mag): persistent tokens, the branch norms, W_out
            if cfg.mem_persistent:
                shapes[b + "mag.persist"] = (cfg.mem_persistent, D)
            shapes.update({b + "mag.norm_a.g": (D,), b + "mag.norm_m.g": (D,), b + "mag.W_out": (D, D)})
        if cfg.family == "titans-mal":  # SPEC.md#titans-mal: persistent tokens, the attention's input norm
            if cfg.mem_persistent:
                shapes[b + "mal.persist"] = (cfg.mem_persistent, D)
            shapes[b + "mal.norm.g"] = (D,)
        if cfg.family == "titans-mac":  # SPEC.md#titans-mac: persistent tokens, the retrieval's query and
            if cfg.mem_persistent:  # norm, the gate's norms and W_out
                shapes[b + "mac.persist"] = (cfg.mem_persistent, D)
            shapes.update({b + "mac.W_q": (D, D), b + "mac.norm_h.g": (D,), b + "mac.norm_a.g": (D,),
                           b + "mac.norm_m.g": (D,), b + "mac.W_out": (D, D)})
        shapes[b + "norm2.g"] = (D,)
        if has_cms(cfg):
            for n, s in cms.param_shapes(D, cfg.cms_levels, cfg.cms_variant).items():
                shapes[b + "cms." + n] = s
        else:
            shapes.update({b + "mlp.W_gate": (F, D), b + "mlp.W_up": (F, D), b + "mlp.W_down": (D, F)})
    shapes["final_norm.g"] = (D,)
    shapes["head.W"] = (V, D)
    return shapes


# ---------------------------------------------------------------------------------------------
# Argument checks (every backend raises the same errors; SPEC.md#public-api)
# ---------------------------------------------------------------------------------------------


def _check_cfg(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig (config.preset(name)), got {type(cfg).__name__}")


def check_params(params, cfg: ModelConfig, xp=np) -> dict:
    """ValueError naming the key and the expected shape; returns the arrays (of namespace ``xp``)
    cast to cfg.dtype."""
    _check_cfg(cfg)
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict[str, np.ndarray] from model.init_params, got {type(params).__name__}")
    dtype = np.dtype(cfg.dtype)
    out = {}
    for key, shape in param_shapes(cfg).items():
        if key not in params:
            raise ValueError(f"params[{key!r}] is missing: expected an array of shape {shape}")
        a = xp.asarray(params[key])
        if a.dtype.kind not in "fc":
            raise ValueError(f"params[{key!r}] must be a float array of shape {shape}, got dtype {a.dtype}")
        if a.shape != shape:
            raise ValueError(f"params[{key!r}] must have shape {shape}, got {a.shape}")
        out[key] = a if a.dtype == dtype or a.dtype.kind == "c" else a.astype(dtype)
    extra = sorted(set(params) - set(out))
    if extra:
        raise ValueError(f"params has keys {extra} that config {cfg.name!r} does not use")
    return out


def check_tokens(tokens, cfg: ModelConfig, min_T: int = 1, xp=np):
    """Tokens (B, T) of ints in [0, V) as int64 (namespace ``xp``); ValueError saying what is wrong."""
    tokens = xp.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer array of shape (B, T), got dtype {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < min_T:
        raise ValueError(f"tokens must have shape (B, T) with B >= 1 and T >= {min_T}, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(
            f"tokens must lie in the vocabulary [0, {cfg.vocab_size}), got values in [{tokens.min()}, {tokens.max()}]"
        )
    return tokens.astype(np.int64)


STATE_KEYS = ("batch", "pos", "past", "mem", "cms", "window", "history")
"""The keys of a streaming state (SPEC.md#hope: what the state carries)."""


def copy_tree(obj):
    """A copy of ``obj`` with every array copied (dicts, lists and tuples rebuilt, other leaves shared)."""
    if hasattr(obj, "copy") and hasattr(obj, "shape") and hasattr(obj, "dtype"):  # an array of any namespace
        return obj.copy()
    if isinstance(obj, dict):
        return {k: copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(copy_tree(v) for v in obj)
    return obj


def check_state(state, cfg: ModelConfig, batch: int) -> dict:
    """A copy of ``state`` after checking its structure: TypeError for a value of the wrong kind,
    ValueError for a wrong batch, position or length, each naming the entry (SPEC.md#hope)."""
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise TypeError(f"state must be the dict returned by model.forward (keys {STATE_KEYS}), "
                        f"got {type(state).__name__}" + (f" with keys {sorted(map(str, state))}" if isinstance(state, dict) else ""))
    for key in ("batch", "pos"):
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise TypeError(f"state[{key!r}] must be a non-negative int, got {v!r}")
    if state["batch"] != batch:
        raise ValueError(f"state is for a batch of {state['batch']} sequences; tokens must have shape "
                         f"({state['batch']}, T), got batch {batch}")
    for key in ("past", "mem", "cms"):
        if not isinstance(state[key], list) or len(state[key]) != cfg.n_layers:
            raise TypeError(f"state[{key!r}] must be a list of {cfg.n_layers} entries (one per block), "
                            f"got {type(state[key]).__name__}")
    if any(not isinstance(f, dict) for f in state["cms"]):
        raise TypeError("state['cms'] must hold one dict of in-context CMS weights per block")
    w = state["window"]
    if not hasattr(w, "shape") or len(w.shape) != 2 or w.shape[0] != batch or w.shape[1] > state["pos"]:
        raise ValueError(f"state['window'] must be an int array of shape ({batch}, n) with n <= state['pos'] "
                         f"= {state['pos']}, got {getattr(w, 'shape', type(w).__name__)}")
    h = state["history"]
    if not isinstance(h, list) or any(not isinstance(r, dict) or not {"start", "mem", "cms"} <= set(r) for r in h):
        raise TypeError("state['history'] must be a list of records {'start', 'mem', 'cms'} from model.forward")
    return copy_tree(state)
