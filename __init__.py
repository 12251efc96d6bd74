"""nlref: Nested Learning (Behrouz, Razaviyayn, Zhong, Mirrokni; arXiv 2512.24695v1).

A pure-NumPy reference with hand-written gradients (``nlref.reference``), the
executable specification, and a compiled port (``nlref.fast``). SPEC.md is normative.

Notation key (SPEC.md#notation): B batch, T tokens, D width, H heads (or MLP hidden width where
a module says so), C chunk size, L levels, V vocabulary. Column vectors: a read is ``M k``.
"""

__version__ = "0.1.0"
SPEC_VERSION = "0.2"
PAPER = "arXiv 2512.24695v1"
