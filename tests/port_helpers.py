"""Small helpers shared by the fast-port equivalence tests (tests/test_fast_cpu_*.py)."""

import numpy as np
from hypothesis import note as _note


def note(msg):
    """``hypothesis.note`` that is also callable outside a hypothesis test (then a no-op)."""
    try:
        _note(msg)
    except Exception:  # outside a hypothesis test
        pass


def readonly(tree):
    """A copy of ``tree`` (dicts of arrays, nested) whose arrays are read-only, so a function that
    writes into its inputs fails loudly; other values are returned as they are."""
    if isinstance(tree, dict):
        return {k: readonly(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        a = np.array(tree)
        a.flags.writeable = False
        return a
    return tree


def copy_tree(tree):
    """A shallow dict copy whose arrays are fresh copies (to check inputs were left unchanged)."""
    return {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in tree.items()}
