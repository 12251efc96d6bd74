"""The GPU port (SPEC.md#fast-gpu): the reference's own code run on CuPy arrays.

``namespace`` (the reference's vectorised modules loaded over CuPy, or over NumPy for CI, and
``cupy_available``), ``einsum`` (the planned contraction), ``activations`` and ``scans`` (CUDA
kernels for the hot spots), ``ops`` (every op of fast/registry.py with a host interface) and
``model`` (the one model driver, SPEC.md#backends, over the namespace: ``FAMILIES``,
``to_device`` / ``to_host``, ``optimizers()``, ``synchronize()``). Importing this package or its
``model`` imports no CuPy; nothing on a CPU path needs it.
"""
