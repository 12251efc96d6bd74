"""The committed conformance vectors (tests/conformance, SPEC.md#conformance) verify on backend "gpu".

Every tensor of every vector (the ops, the CMS chains, the four model families; float32 and
float64) must be within the vector's own tolerance and the ("gpu") row of tests/tolerances.py, as
the reference and the CPU port are in tests/project/test_conformance.py; each row's relative error is
recorded in $NL_GPU_ERRORS. Committed files are compared within a tolerance, never bit for bit:
they hold the rounding of the machine that wrote them (another machine's BLAS and libm reproduce
them to ~1e-6 in float32, not exactly). Over the NumPy namespace the GPU port must moreover be the
reference bit for bit, both computed now in this process on the same inputs.

Skipped without CuPy and a CUDA device (NL_REQUIRE_GPU=1: an error instead);
NL_GPU_TESTS_ON_NUMPY=1 runs it on NumPy to check the test itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu_helpers import ON_NUMPY, assert_bitwise_tree, record_error, require_gpu
from tolerances import tol

from nlref import conformance as conf

pytestmark = pytest.mark.gpu
DEVICE = require_gpu()
COMMITTED = Path(__file__).resolve().parents[1] / "conformance"


def test_committed_vectors_verify_on_the_gpu():
    from nlref.fast.gpu.model import FAMILIES

    rows = conf.verify(COMMITTED, backend="gpu")
    skipped = [r for r in rows if "skipped" in r]  # the families the GPU port does not compute yet
    assert all(r["skipped"].split()[-1] not in FAMILIES for r in skipped), skipped
    rows = [r for r in rows if "skipped" not in r]
    for r in rows:
        r["dtype"] = "float32" if ".float32:" in r["name"] else "float64"
        record_error(r["name"], r["dtype"], r["max_rel"], "conformance", r["tolerance"])
    names = {r["name"].split(":")[0] for r in rows + skipped}
    assert names == set(conf.vector_names()), "the committed set must hold every vector"
    assert any(r["name"].endswith("grad.blocks.0.mem.memory.W1_0") for r in rows)  # hope: every gradient
    bad = [r for r in rows if not (r["ok"] and r["max_rel"] <= tol(r["dtype"], "gpu"))]
    assert not bad, "\n".join(f"{r['name']}: max rel {r['max_rel']:.3e} > {r['tolerance']:.1e} / "
                              f"{tol(r['dtype'], 'gpu'):.1e} {r.get('error', '')}" for r in bad[:20])  # fmt: skip
    if ON_NUMPY:  # the same computation on both sides, both made now: bit for bit (not the files)
        for f in sorted(COMMITTED.glob("*.npz")):
            meta, groups = conf.load_vector(f)
            if meta.get("config", {}).get("family", "transformer") not in FAMILIES:
                continue
            assert_bitwise_tree(conf.run_vector(meta, groups, "gpu"), conf.run_vector(meta, groups, "reference"),
                                f.name)
