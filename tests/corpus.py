"""A small text corpus for the tests that train (not a test file): a few repeated words, so a
tiny model learns structure in a few steps."""

import numpy as np

WORDS = "the memory learns to compress its context into weights while the optimizer learns gradients".split()


def write_corpus(path, n_docs=8, n_words=300, seed=0):
    """``n_docs`` files doc<i>.txt of ``n_words`` words drawn from WORDS under ``path`` (created);
    returns ``path``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (path / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=n_words)))
    return path
