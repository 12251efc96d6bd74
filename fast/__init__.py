"""Compiled ports of the reference (Numba on CPU, CuPy on GPU). Filled by later issues."""
