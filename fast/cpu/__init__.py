"""The CPU port (SPEC.md#fast-cpu): the reference's training path on Numba + BLAS.

``primitives`` (the forward/backward pairs of reference/primitives.py), ``vmath`` (vectorised
float32 activations), ``blas`` (one BLAS thread limit), ``allocator`` (glibc's heap settings for
training processes), ``cms`` (the Continuum Memory System),
``memory`` (the matrix-memory rules' token loops), ``mlp_memory``, ``titans`` and ``selfmod``
(the sequence-memory layers) and ``model``: the one model driver (SPEC.md#backends) over these
modules, every family (the linear families' layer is the reference's, a counted fallback:
``model.PORTED_LAYERS``), with the batch split over cores. Importing this package imports no
Numba; its modules compile lazily (``cache=True``).
"""
