"""CuPy port (issue: fast/gpu). Not yet implemented; never imported by CPU paths."""
