"""The committed conformance vectors (tests/conformance, SPEC.md#conformance) verify on backend "gpu".

Every tensor of every vector (the ops, the CMS chains, the four model families; float32 and
float64) must be within the vector's own tolerance, as the reference and the CPU port are in
tests/test_conformance.py; each row's relative error is recorded in $NL_GPU_ERRORS.

Skipped without CuPy and a CUDA device (NL_REQUIRE_GPU=1: an error instead);
NL_GPU_TESTS_ON_NUMPY=1 runs it on NumPy to check the test itself.
"""

from __future__ import annotations

from pathlib import Path

from gpu_helpers import ON_NUMPY, record_error, require_gpu

from nested_learning import conformance as conf

DEVICE = require_gpu()
COMMITTED = Path(__file__).parent / "conformance"


def test_committed_vectors_verify_on_the_gpu():
    rows = conf.verify(COMMITTED, backend="gpu")
    for r in rows:
        dtype = "float32" if ".float32:" in r["name"] else "float64"
        record_error(r["name"], dtype, r["max_rel"], "conformance", r["tolerance"])
    names = {r["name"].split(":")[0] for r in rows}
    assert names == set(conf.vector_names()), "the committed set must hold every vector"
    assert any(r["name"].endswith("grad.blocks.0.mem.memory.W1_0") for r in rows)  # hope: every gradient
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['name']}: max rel {r['max_rel']:.3e} > {r['tolerance']:.1e} {r.get('error', '')}"
                              for r in bad[:20])  # fmt: skip
    if ON_NUMPY:  # the reference's own computation, which wrote the vectors (it reproduces them exactly)
        assert max(r["max_rel"] for r in rows) == 0.0
