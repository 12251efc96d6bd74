"""The compiled ports of the reference: ``cpu`` (Numba + BLAS) and ``gpu`` (CuPy).

SPEC: SPEC.md#backends (one model driver; what each port passes it), SPEC.md#fast-cpu,
SPEC.md#fast-gpu. ``fast/cpu/`` and ``fast/gpu/`` compute the same functions as ``reference/``
with the same names, signatures and return structures; ``fast/registry.py`` is the op table
(op -> reference / cpu / gpu import strings) and ``fast/model.py`` the model API with
``device="cpu" | "gpu"``. The backend names and what each backend needs live in ``backends.py``.
Importing this package imports neither Numba nor CuPy.
"""
