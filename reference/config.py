"""Model configuration: frozen dataclasses, validation and the named presets.

Paper: §7-§8.3, Eqs. (70)-(74), (94)-(97), arXiv 2512.24695v1 (the paper gives no sizes for its
models; every number here is a decision recorded in SPEC.md#hope).

Symbols (paper symbol -> code name):

    d_in / d        d_model           model width D
    C^(l)           CMSLevel.period   update period of CMS level l, in tokens (None: frozen)
    eta^(l)         CMSLevel.eta      inner learning rate of CMS level l
    hidden of MLP^(f_l)  CMSLevel.hidden   hidden width of level l's MLP
    V               vocab_size        256 for byte-level tokens

Decisions where the paper is open (SPEC.md#hope, SPEC.md#cms):
    - the presets' widths, depths, CMS levels, periods and inner learning rates;
    - ``dtype`` is the computation dtype of every array (parameters are drawn in float64 and
      cast), ``cms_in_context=False`` turns every CMS level into a static MLP;
    - every period of an in-context CMS level must be a multiple of the shortest one (the
      processing chunk of the model, SPEC.md#hope).

This module imports only the standard library, so ``from nlref import config`` never
pulls numpy's heavy friends, numba or cupy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FAMILIES = ("hope", "hope-attention", "titans", "transformer", "linear-attention", "deltanet", "gated-deltanet",
            "dgd", "titans-mag", "titans-mal", "titans-mac")
LINEAR_FAMILIES = ("linear-attention", "deltanet", "gated-deltanet", "dgd")  # reference/linear_layers.py
# Titans' attention + memory hybrids (reference/blocks.py, SPEC.md#titans-mag, SPEC.md#titans-mal)
HYBRID_FAMILIES = ("titans-mag", "titans-mal", "titans-mac")  # + SPEC.md#titans-mac
# ModelConfig field -> its default: the fields of the Titans hybrids only (SPEC.md#titans-mag, #titans-mal)
HYBRID_FIELDS = {"attn_window": 64, "mem_persistent": 16}
CMS_VARIANTS = ("sequential", "independent")
ACTIVATIONS = ("gelu", "silu")
DTYPES = ("float32", "float64")
# ModelConfig field -> its default: the switches of the self-modifying Titans layer (the
# SelfModConfig field of the same name without ``mem_``), SPEC.md#hope "Ablation switches"
SELFMOD_SWITCHES = {"mem_momentum": True, "mem_adaptive_q": False, "mem_normalize_v": True,
                    "mem_single_shrink": False, "mem_stop_grad_writes": False, "mem_layernorm": False,
                    "mem_dgd": True, "mem_retention": True, "mem_adaptive_k": True, "mem_adaptive_v": True,
                    "mem_step_norm": False}
# The switches of SELFMOD_SWITCHES that the Titans memory layer has too (TitansConfig, same names without
# ``mem_``), so the titans families take them: mem_layernorm, Titans §3.3's z + LN(W1 s(W2 z)) (SPEC.md#titans-stability)
TITANS_SWITCHES = ("mem_layernorm",)


@dataclass(frozen=True)
class CMSLevel:
    """One level of the Continuum Memory System: a residual MLP z + W1 act(W2 z) (SPEC.md#cms).

    ``period``: tokens between two in-context updates (None: frozen in context, only the outer
    optimizer moves it). ``eta``: the level's inner learning rate.
    """

    hidden: int
    period: int | None = None
    eta: float = 0.0

    def __post_init__(self):
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"CMSLevel.hidden must be a positive int, got {self.hidden!r}")
        if self.period is not None and (not isinstance(self.period, int) or self.period < 1):
            raise ValueError(f"CMSLevel.period must be None or a positive int (tokens), got {self.period!r}")
        if not float(self.eta) >= 0.0:
            raise ValueError(f"CMSLevel.eta must be >= 0, got {self.eta!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A language model: embedding, ``n_layers`` blocks of one family, final RMSNorm, head.

    Families (SPEC.md#hope): ``hope`` (self-modifying Titans then CMS), ``hope-attention``
    (causal softmax attention then CMS), ``titans`` (the Titans memory layer then a SwiGLU MLP),
    ``transformer`` (Transformer++: RoPE attention then SwiGLU), ``linear-attention``, ``deltanet``,
    ``gated-deltanet``, ``dgd`` (reference/linear_layers.py then SwiGLU, SPEC.md#linear-families), ``titans-mag``
    (Titans' memory as a gate: sliding-window attention gated by the Titans layer, both over the
    persistent tokens and the input, then SwiGLU; SPEC.md#titans-mag), ``titans-mal`` (Titans' memory
    as a layer: the Titans layer over the persistent tokens and the input, then sliding-window
    attention over its output, then SwiGLU; SPEC.md#titans-mal), ``titans-mac`` (Titans' memory as
    context: per segment, attention over the persistent tokens, the memory's retrieval and the
    segment, the memory written with its output and gating it, then SwiGLU; SPEC.md#titans-mac).
    Every block is pre-norm
    residual with RMSNorm.
    """

    name: str = "custom"
    family: str = "transformer"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int = 512  # SwiGLU hidden width F (transformer, titans)
    cms_levels: tuple[CMSLevel, ...] = ()
    cms_variant: str = "sequential"  # Eq. (73) chained, or "independent" (Eq. 74)
    cms_activation: str = "gelu"
    cms_in_context: bool = True
    # nested CMS (Eq. 72, SPEC.md#cms "Nested CMS"): each in-context level's initial state is a
    # per-sequence state meta-learned by the next slower in-context level, to which the level is
    # reset at that level's chunk ends
    cms_nested: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"
    # the sequence-memory layer of the titans / hope families (see reference/titans.py, selfmod.py)
    mem_chunk: int = 16  # Titans chunk (C) / self-modifying Titans chunk_memory
    mem_chunk_other: int = 16  # self-modifying Titans chunk_other
    mem_kind: str = "mlp"  # "matrix" or "mlp" memory
    mem_hidden: int = 0  # hidden width of an MLP memory; 0 means 4 * d_head
    mem_eta_max: float = 0.1  # the memory layer's inner learning rate bound, eta = eta_max sigmoid(.)
    # the ablation switches of the hope family's self-modifying Titans layer (reference/selfmod.py
    # SelfModConfig, same names without ``mem_``; SPEC.md#hope "Ablation switches"). The defaults
    # are SelfModConfig's, the pinned readings of SPEC.md#selfmod.
    mem_momentum: bool = True  # S <- beta S - eta' G (Table 6 "w/o Momentum": False)
    mem_adaptive_q: bool = False  # q from a memory M_q (Table 6's Hope row; the text: q static)
    mem_normalize_v: bool = True  # l2-normalised v (False: the paper's literal reading)
    mem_single_shrink: bool = False  # normalised delta rule onto v_hat (mem_kind="matrix" only)
    mem_stop_grad_writes: bool = False  # first-order outer gradient through the writes
    mem_layernorm: bool = False  # z + LN(W1 s(W2 z)) in every memory (not in NL's equations; Titans §3.3's,
    # so the titans families take it too and their presets from small up set it, SPEC.md#titans)
    mem_dgd: bool = True  # DGD writes (Eq. 88); False: Table 6 "w/o DGD", alpha W - eta grad (+ momentum)
    mem_retention: bool = True  # the alpha gate; False: Table 6 "w/o weight decay", alpha = 1
    mem_adaptive_k: bool = True  # k from the memory M_k; False: Table 6 "w/o inner-projection k" (static W_k)
    mem_adaptive_v: bool = True  # v from the memory M_v; False: Table 6 "w/o inner-projection v" (static W_v)
    mem_step_norm: bool = False  # each inner gradient times 1 / (1 + eta C lambda): not in the paper, SPEC.md#hope-stability
    # the Titans hybrids (SPEC.md#titans-mag, SPEC.md#titans-mal): the sliding window of the attention
    # (keys a query sees, itself included; MAC: the segment length C) and N_p, the persistent tokens prepended
    # to each block's mixer input (MAC: to each segment's attention)
    attn_window: int = 64
    mem_persistent: int = 16

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"config {self.name!r}: {msg}")

        if self.family not in FAMILIES:
            bad(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.dtype not in DTYPES:
            bad(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                bad(f"{key} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            bad(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2 and self.family in ("transformer", "hope-attention"):
            bad(f"the head width d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE pairs)")
        if self.family in ("transformer", "titans", *LINEAR_FAMILIES, *HYBRID_FAMILIES) and (
                not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
            bad(f"mlp_hidden must be a positive int for family {self.family!r}, got {self.mlp_hidden!r}")
        if not isinstance(self.cms_nested, bool):
            bad(f"cms_nested must be true or false, got {self.cms_nested!r}")
        if self.cms_nested:
            live = [lv.period for lv in self.cms_levels if lv.period is not None] if self.cms_in_context else []
            if len(set(live)) < 2:
                bad("cms_nested needs at least two CMS levels written in context with different periods "
                    f"(a slower one meta-learns a faster one's initial state, Eq. 72); in-context periods: {live}")
            distinct = sorted(set(live))
            if any(b % a for a, b in zip(distinct, distinct[1:], strict=False)):
                bad(f"cms_nested needs each in-context period to be a multiple of the next shorter one (a level "
                    f"restarts at its parent's chunk ends, which must be its own), got {distinct}")
        if self.cms_variant not in CMS_VARIANTS:
            bad(f"cms_variant must be one of {CMS_VARIANTS}, got {self.cms_variant!r}")
        if self.cms_activation not in ACTIVATIONS:
            bad(f"cms_activation must be one of {ACTIVATIONS}, got {self.cms_activation!r}")
        levels = tuple(self.cms_levels)
        if any(not isinstance(lv, CMSLevel) for lv in levels):
            bad("cms_levels must be a tuple of CMSLevel")
        object.__setattr__(self, "cms_levels", levels)
        if self.family in ("hope", "hope-attention"):
            if not levels:
                bad(f"family {self.family!r} needs at least one CMS level")
            periods = [lv.period for lv in levels if lv.period is not None]
            if periods:
                c = min(periods)
                if any(p % c for p in periods):
                    bad(f"every CMS period must be a multiple of the shortest ({c}), got {periods}")
        elif levels:
            bad(f"family {self.family!r} has no CMS; cms_levels must be empty")
        for key in ("mem_chunk", "mem_chunk_other"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                bad(f"{key} must be a positive int (tokens), got {v!r}")
        if self.mem_kind not in ("matrix", "mlp"):
            bad(f"mem_kind must be 'matrix' or 'mlp', got {self.mem_kind!r}")
        if not isinstance(self.mem_hidden, int) or self.mem_hidden < 0:
            bad(f"mem_hidden must be an int >= 0, got {self.mem_hidden!r}")
        if not float(self.mem_eta_max) > 0:
            bad(f"mem_eta_max must be positive, got {self.mem_eta_max!r}")
        if not self.norm_eps > 0 or not self.init_std > 0 or not self.rope_base > 0:
            bad("norm_eps, init_std and rope_base must be positive")
        for key, default in SELFMOD_SWITCHES.items():  # SPEC.md#hope, ablation switches
            v = getattr(self, key)
            if not isinstance(v, bool):
                bad(f"{key} must be true or false, got {v!r}")
            titans = key in TITANS_SWITCHES and self.family in ("titans", *HYBRID_FAMILIES)
            if v != default and self.family != "hope" and not titans:
                also = " and of the Titans memory families" if key in TITANS_SWITCHES else ""
                bad(f"{key} is a switch of the hope family's self-modifying layer{also}; family {self.family!r} "
                    f"has none (leave it at {default})")
        for key, default in HYBRID_FIELDS.items():  # SPEC.md#titans-mag
            v = getattr(self, key)
            least = 1 if key == "attn_window" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                bad(f"{key} must be an int >= {least}, got {v!r}")
            if v != default and self.family not in HYBRID_FAMILIES:
                bad(f"{key} is a field of the Titans hybrid families {HYBRID_FAMILIES}; family {self.family!r} "
                    f"has none (leave it at {default})")
        if self.mem_layernorm and self.mem_kind != "mlp" and self.family != "hope":
            bad(f"mem_layernorm is the LayerNorm of an MLP memory (SPEC.md#titans); family {self.family!r} with "
                f"mem_kind={self.mem_kind!r} has none")
        if self.mem_step_norm and self.mem_layernorm:
            bad("mem_step_norm's curvature bound is that of the memory without LayerNorm; set one of "
                "mem_step_norm and mem_layernorm (SPEC.md#hope-stability)")
        if self.mem_single_shrink and self.mem_kind != "matrix":
            bad(f"mem_single_shrink needs mem_kind='matrix' (SPEC.md#selfmod), got {self.mem_kind!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def cms_chunk(self) -> int | None:
        """The processing chunk (tokens) of the chunk-major pass: the shortest period of an
        in-context CMS level, or None when no level updates in context (SPEC.md#hope)."""
        if not self.cms_in_context:
            return None
        periods = [lv.period for lv in self.cms_levels if lv.period is not None]
        return min(periods) if periods else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cms_levels"] = [dataclasses.asdict(lv) for lv in self.cms_levels]
        return d


def from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from a plain dict (e.g. parsed TOML); unknown keys are a ValueError."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(names)}")
    d = dict(d)
    if "cms_levels" in d:
        d["cms_levels"] = tuple(lv if isinstance(lv, CMSLevel) else CMSLevel(**lv) for lv in d["cms_levels"])
    return ModelConfig(**d)


def _tiny(family: str, **kw) -> ModelConfig:
    base = dict(
        name=f"{family}-tiny", family=family, vocab_size=11, d_model=8, n_layers=2, n_heads=2,
        mlp_hidden=12, dtype="float64", init_std=0.3, mem_chunk=2, mem_chunk_other=2, mem_hidden=4,
    )
    base.update(kw)
    return ModelConfig(**base)


def _small(family: str, **kw) -> ModelConfig:
    base = dict(
        name=f"{family}-small", family=family, vocab_size=256, d_model=128, n_layers=2, n_heads=4,
        mlp_hidden=1024, dtype="float32", init_std=0.02, mem_chunk=16, mem_chunk_other=16,
    )
    base.update(kw)
    return ModelConfig(**base)


def _medium(family: str, **kw) -> ModelConfig:
    base = dict(
        name=f"{family}-medium", family=family, vocab_size=256, d_model=256, n_layers=4, n_heads=8,
        mlp_hidden=2048, dtype="float32", init_std=0.02, mem_chunk=16, mem_chunk_other=16,
    )
    base.update(kw)
    return ModelConfig(**base)


# CMS levels of the presets, applied in this order (first = closest to the block input). The tiny
# levels update every 2 and 4 tokens so that a test sequence of ~10 tokens crosses several
# boundaries; the small ones every 16 and 64 tokens, plus a frozen level (SPEC.md#hope).
_TINY_CMS = (CMSLevel(hidden=8, period=2, eta=0.05), CMSLevel(hidden=8, period=4, eta=0.02),
             CMSLevel(hidden=8, period=None))
_SMALL_CMS = (CMSLevel(hidden=512, period=16, eta=1e-3), CMSLevel(hidden=512, period=64, eta=1e-3),
              CMSLevel(hidden=512, period=None))
_SMALL_HOPE_CMS = tuple(dataclasses.replace(lv, hidden=384) for lv in _SMALL_CMS)  # the memories take the rest
# medium (benchmarks, SPEC.md#hope): width 256, 4 layers, 8 heads of 32, about 7M parameters per family; the
# hope memories' MLP hidden width is 2 d_head (not 4) so that one reference step of 4 x 256 tokens stays
# under ~2 minutes on 2 cores (measured 137 s at 4 d_head, 75 s at 2 d_head)
_MEDIUM_CMS = tuple(dataclasses.replace(lv, hidden=1024) for lv in _SMALL_CMS)
_MEDIUM_HOPE_CMS = tuple(dataclasses.replace(lv, hidden=896) for lv in _SMALL_CMS)

# GPU-sized (issue 21, SPEC.md#hope "GPU-sized presets"): ~50M parameters (width 512, 12 layers, 8 heads of
# 64) and ~125M (width 768, 13 layers, 12 heads of 64), each family within 10 % of its transformer; the
# hope memories' MLP hidden width is 2 d_head as at medium. Meant for --backend gpu with batches like
# 32 x 1,024 tokens; they run (slowly) on every backend.
def _gpu(family: str, size: str, **kw) -> ModelConfig:
    D, L, H, F = {"50m": (512, 12, 8, 2048), "125m": (768, 13, 12, 3072)}[size]
    base = dict(name=f"{family}-{size}", family=family, vocab_size=256, d_model=D, n_layers=L, n_heads=H,
                mlp_hidden=F, dtype="float32", init_std=0.02, mem_chunk=16, mem_chunk_other=16)
    base.update(kw)
    return ModelConfig(**base)


# The memory of the Titans presets from small up (SPEC.md#titans-stability): Titans §3.3's LayerNorm memory, eta_max 0.01
_TITANS_MEMORY = dict(mem_layernorm=True, mem_eta_max=0.01)


# The self-modifying layer's inner step bound of the hope presets from small up (SPEC.md#hope-stability):
# at 0.01 the full ablate run diverged in 11 of 24 runs (repeated keys overshoot, as Titans' memory)
_HOPE_ETA = 0.003
_HOPE_SMALL = dict(cms_levels=_SMALL_HOPE_CMS, mem_eta_max=_HOPE_ETA)


def _gpu_cms(hidden: int) -> tuple[CMSLevel, ...]:
    return tuple(dataclasses.replace(lv, hidden=hidden) for lv in _SMALL_CMS)


PRESETS: dict[str, ModelConfig] = {
    "transformer-tiny": _tiny("transformer"),
    "hope-attention-tiny": _tiny("hope-attention", cms_levels=_TINY_CMS),
    "titans-tiny": _tiny("titans", n_heads=2),
    "hope-tiny": _tiny("hope", cms_levels=_TINY_CMS),
    "linear-attention-tiny": _tiny("linear-attention"),
    "deltanet-tiny": _tiny("deltanet"),
    "gated-deltanet-tiny": _tiny("gated-deltanet"),
    "dgd-tiny": _tiny("dgd"),
    # Titans MAG (SPEC.md#titans-mag): a 3-token window and 2 persistent tokens, so that a test
    # sequence of ~10 tokens slides the window and crosses the memory's 2-token chunks
    "titans-mag-tiny": _tiny("titans-mag", attn_window=3, mem_persistent=2),
    # Titans MAL (SPEC.md#titans-mal): the same window and persistent tokens as titans-mag-tiny
    "titans-mal-tiny": _tiny("titans-mal", attn_window=3, mem_persistent=2),
    # Titans MAC (SPEC.md#titans-mac): 4-token segments (attn_window) and 2 persistent tokens, so that a test
    # sequence of ~10 tokens crosses segments and the memory's 2-token chunks
    "titans-mac-tiny": _tiny("titans-mac", attn_window=4, mem_persistent=2),
    "transformer-small": _small("transformer"),
    "hope-attention-small": _small("hope-attention", cms_levels=_SMALL_CMS),
    # the Titans presets from small up: Titans §3.3's memory z + LN(W1 s(W2 z)) and eta_max 0.01;
    # without both the default run's loss is NaN within a few steps (a 16-token chunk of repeated keys
    # overshoots and the MLP memory's weights grow without bound, SPEC.md#titans-stability)
    "titans-small": _small("titans", mlp_hidden=896, **_TITANS_MEMORY),
    "hope-small": _small("hope", **_HOPE_SMALL),
    "linear-attention-small": _small("linear-attention"),  # the transformer-small's SwiGLU width
    "deltanet-small": _small("deltanet"),
    "gated-deltanet-small": _small("gated-deltanet"),
    "dgd-small": _small("dgd"),
    "titans-mag-small": _small("titans-mag", mlp_hidden=672, attn_window=64, mem_persistent=16, **_TITANS_MEMORY),
    "titans-mac-small": _small("titans-mac", mlp_hidden=624, attn_window=64, mem_persistent=16, **_TITANS_MEMORY),
    "titans-mal-small": _small("titans-mal", mlp_hidden=712, attn_window=64, mem_persistent=16, **_TITANS_MEMORY),
    "transformer-medium": _medium("transformer"),
    "hope-attention-medium": _medium("hope-attention", cms_levels=_MEDIUM_CMS),
    "titans-medium": _medium("titans", mlp_hidden=1792, **_TITANS_MEMORY),
    "hope-medium": _medium("hope", cms_levels=_MEDIUM_HOPE_CMS, mem_eta_max=_HOPE_ETA, mem_hidden=64),
    "transformer-50m": _gpu("transformer", "50m"),  # 50,606,592 parameters
    "hope-attention-50m": _gpu("hope-attention", "50m", cms_levels=_gpu_cms(1024)),  # 50,606,592
    "titans-50m": _gpu("titans", "50m", mlp_hidden=1664, **_TITANS_MEMORY),  # 50,042,400
    "hope-50m": _gpu("hope", "50m", cms_levels=_gpu_cms(896), mem_eta_max=_HOPE_ETA, mem_hidden=128),  # 50,694,048
    "transformer-125m": _gpu("transformer", "125m"),  # 123,097,344
    "hope-attention-125m": _gpu("hope-attention", "125m", cms_levels=_gpu_cms(1536)),  # 123,097,344
    "titans-125m": _gpu("titans", "125m", mlp_hidden=2560, **_TITANS_MEMORY),  # 121,021,972
    "hope-125m": _gpu("hope", "125m", cms_levels=_gpu_cms(1536), mem_eta_max=_HOPE_ETA, mem_hidden=128),  # 128,350,852
    # Table 6's ablations that the existing switches build (SPEC.md#hope, "Ablation presets")
    "hope-small-no-momentum": _small("hope", name="hope-small-no-momentum", **_HOPE_SMALL, mem_momentum=False),
    "hope-small-no-cms": _small("hope", name="hope-small-no-cms", **_HOPE_SMALL, cms_in_context=False),
    "hope-small-adaptive-q": _small("hope", name="hope-small-adaptive-q", **_HOPE_SMALL, mem_adaptive_q=True),
    "hope-small-no-retention": _small("hope", name="hope-small-no-retention", **_HOPE_SMALL, mem_retention=False),  # Table 6 "w/o weight decay"
    "hope-small-no-dgd": _small("hope", name="hope-small-no-dgd", **_HOPE_SMALL, mem_dgd=False),
    "hope-small-static-k": _small("hope", name="hope-small-static-k", **_HOPE_SMALL, mem_adaptive_k=False),
    "hope-small-static-v": _small("hope", name="hope-small-static-v", **_HOPE_SMALL, mem_adaptive_v=False),
    # nested CMS (Eq. 72, SPEC.md#cms): the 64-token level meta-learns the 16-token level's initial state
    "hope-small-nested": _small("hope", name="hope-small-nested", **_HOPE_SMALL, cms_nested=True),
    # the public Hope reproduction's level periods (issue 20 item 4, SPEC.md#hope "Presets"): four in-context
    # levels of periods 1, 4, 32, 128, the fastest an online step per token (processing chunk 1)
    "hope-small-online-cms": _small("hope", name="hope-small-online-cms", mem_eta_max=_HOPE_ETA,
                                    cms_levels=tuple(CMSLevel(hidden=384, period=p, eta=1e-3) for p in (1, 4, 32, 128))),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str) -> ModelConfig:
    """The named preset (a frozen dataclass; change it with ``dataclasses.replace``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "ACTIVATIONS", "CMS_VARIANTS", "CMSLevel", "DTYPES", "FAMILIES", "HYBRID_FAMILIES", "HYBRID_FIELDS", "LINEAR_FAMILIES", "ModelConfig", "PRESETS", "SELFMOD_SWITCHES",
    "from_dict", "preset", "preset_names",
]
