"""The reference: pure NumPy, the executable specification (SPEC.md is normative).

No numba, no cupy, no hidden state. Every backward is written by hand and checked in float64
against finite differences (reference/gradcheck.py).

Notation key (SPEC.md#notation): B batch, T tokens, D width, H heads or hidden width, C chunk
size, L levels, V vocabulary. Column vectors; a matrix memory M has shape (d_v, d_k) and a read
is ``M k``; batched inputs put features last, so a batch of reads is ``k @ M.T``.
"""
