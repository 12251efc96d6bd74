"""The hypothesis strategies several test files share (not a test file: nothing here is collected).

Each is written once here and imported where it is drawn: the dtypes and seeds most property tests
draw, and the configurations of the port tests, which the CPU port's tests (tests/cpu/test_cpu_*.py)
and the GPU port's (tests/gpu/test_gpu_device_*.py, tests/gpu/test_gpu_over_numpy_namespace.py) both draw. A test keeps
the same draws wherever it imports them from: hypothesis derives a derandomized test's examples from
the test function (its source and name), not from where its strategies are defined.
"""

from __future__ import annotations

from hypothesis import strategies as st

from nlref import config

DTYPES = st.sampled_from(["float32", "float64"])
"""The two float dtypes every port is checked in (as strings, the configs' and ``np.dtype``'s form)."""

SEEDS = st.integers(0, 2**16)
"""A seed for ``np.random.default_rng``: the inputs of one example."""

FAMILIES = ("transformer", "hope-attention", "titans", "hope")
"""The model families the ports cover, the order of the model tests' parametrisations."""

# fast.cpu.mlp_memory / fast.gpu's MLP memory vs reference.mlp_memory: leading dims, token count,
# widths, the activation, LayerNorm on the memory's branch; inputs from cases_fast.mlp_inputs.
mlp_memory_configs = st.fixed_dictionaries(
    {
        "lead": st.sampled_from([(1,), (2,), (2, 3)]),
        "N": st.integers(1, 6),
        "D": st.integers(3, 6),
        "Hm": st.integers(2, 7),
        "act": st.sampled_from(["gelu", "silu", "sigmoid", "softplus"]),
        "layernorm": st.booleans(),
        "dtype": DTYPES,
        "seed": SEEDS,
    }
)

# One Titans layer (cases_fast.titans_make): matrix / MLP memory, LayerNorm, momentum and retention
# on/off, chunk sizes that do not divide T, stop_grad_writes (1 in 4), a stream continued from inside
# a chunk (T0 tokens before).
titans_layer_configs = st.fixed_dictionaries(
    {
        "B": st.integers(1, 2),
        "T": st.integers(1, 9),
        "T0": st.integers(1, 5),
        "H": st.integers(1, 2),
        "dh": st.integers(3, 4),
        "Hm": st.integers(2, 5),
        "chunk": st.integers(1, 5),
        "memory": st.sampled_from(["matrix", "mlp"]),
        "layernorm": st.booleans(),
        "momentum": st.booleans(),
        "retention": st.booleans(),
        "sg": st.sampled_from([False, False, False, True]),
        "stream": st.booleans(),
        "dtype": DTYPES,
        "seed": SEEDS,
    }
)

# One self-modifying Titans layer (cases_fast.selfmod_make): MLP / matrix memories, the two chunk
# sizes, LayerNorm (float64 draws only), momentum, adaptive q, DGD, adaptive (or static) k and v,
# single shrink, stop_grad_writes, step_norm, a continued stream, and which state cotangents the backward gets.
selfmod_layer_configs = st.fixed_dictionaries(
    {
        "B": st.integers(1, 2),
        "T": st.integers(1, 9),
        "T0": st.integers(1, 4),
        "H": st.integers(1, 2),
        "dh": st.integers(2, 3),
        "Hm": st.integers(2, 4),
        "memory": st.sampled_from(["mlp", "matrix"]),
        "cm": st.integers(1, 5),
        "co": st.integers(1, 5),
        "layernorm": st.booleans(),
        "momentum": st.booleans(),
        "adaptive_q": st.booleans(),
        "single_shrink": st.booleans(),
        "dgd": st.sampled_from([True, True, False]),  # False: Table 6 "w/o DGD"
        "retention": st.sampled_from([True, True, False]),  # False: Table 6 "w/o weight decay"
        # False: Table 6 "w/o inner-projection k" / "v" (static k / v: x W_k^T, x W_v^T)
        "adaptive_k": st.sampled_from([True, True, True, False]),
        "adaptive_v": st.sampled_from([True, True, True, False]),
        "sg": st.sampled_from([False, False, False, True]),
        "step_norm": st.sampled_from([False, False, True]),  # the curvature-normalised step (not with LN)
        "stream": st.booleans(),
        # dense: every state key; none: no dstate; partial: only some memories' cotangents (the
        # port skips the write backward of a memory while its cotangents are zero)
        "dstate": st.sampled_from(["dense", "dense", "none", "partial"]),
        "dtype": DTYPES,
        "seed": SEEDS,
    }
)


@st.composite
def model_configs(draw, family):
    """A small ModelConfig of ``family``: dtype, heads and widths, layers, memory kind and chunk
    sizes; for the CMS families the levels (periods None / c / 2c), variant, activation and
    in-context or static CMS."""
    dtype = draw(DTYPES)
    H = draw(st.integers(1, 2))
    dh = draw(st.sampled_from([2, 4]))
    kw = dict(name="drawn", family=family, vocab_size=draw(st.integers(3, 12)), d_model=H * dh,
              n_layers=draw(st.integers(1, 2)), n_heads=H, mlp_hidden=draw(st.integers(2, 6)), dtype=dtype,
              init_std=0.3, mem_chunk=draw(st.integers(1, 3)), mem_chunk_other=draw(st.integers(1, 3)),
              mem_kind=draw(st.sampled_from(["matrix", "mlp"])), mem_hidden=draw(st.integers(2, 4)))
    if family in ("hope", "hope-attention"):
        c = draw(st.integers(1, 3))
        n_levels = draw(st.integers(1, 3))
        levels = tuple(config.CMSLevel(hidden=draw(st.integers(2, 5)),
                                       period=draw(st.sampled_from([None, c, 2 * c])),
                                       eta=draw(st.sampled_from([0.0, 0.05, 0.2]))) for _ in range(n_levels))
        kw.update(cms_levels=levels, cms_variant=draw(st.sampled_from(["sequential", "independent"])),
                  cms_activation=draw(st.sampled_from(["gelu", "silu"])), cms_in_context=draw(st.booleans()))
    if family in ("titans", "titans-mag", "titans-mal", "titans-mac") and kw["mem_kind"] == "mlp" and dh == 4 and dtype == "float64":
        # Titans §3.3's LayerNorm memory (the presets from small up, SPEC.md#titans); dh = 4: over 2 entries the
        # normalised branch is the constant +-1 (see mlp_memory_reference_configs); float64 as the selfmod LN draws
        kw.update(mem_layernorm=draw(st.booleans()))
    return config.ModelConfig(**kw)


MLP_ACTS = ["gelu", "silu", "sigmoid", "softplus"]


@st.composite
def mlp_memory_reference_configs(draw, acts=MLP_ACTS):
    """Small random configurations of the reference MLP memory's own tests (tests/reference/test_mlp_memory.py;
    inputs from cases_reference.mlp_reference_inputs). With LayerNorm, D >= 3 and Hm >= 2: for D <= 2
    the normalised branch is the constant +-1 and for Hm = 1 it is invariant to s(W2 z), so its
    derivatives are O(eps) cancellations (SPEC.md#mlp-memory), not a useful test of the code."""
    layernorm = draw(st.booleans())
    return {
        "lead": tuple(draw(st.lists(st.integers(1, 2), max_size=2))),
        "N": draw(st.integers(1, 3)),
        "D": draw(st.integers(3, 4) if layernorm else st.integers(1, 3)),
        "Hm": draw(st.integers(2 if layernorm else 1, 4)),
        "act": draw(st.sampled_from(acts)),
        "layernorm": layernorm,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
