"""Numba port (issue: fast/cpu). Not yet implemented."""
