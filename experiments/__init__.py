"""``nested-learning experiment ...``: the paper's claims tested at a scale anyone can run.

Paper: §8 (experiments: Tables 1-6, the continual-learning and long-context claims),
arXiv 2512.24695v1. Issue 17 asks for one command per question; each has a ``--quick`` scale
(about two minutes on 2 cores), a full scale (documented in docs/experiments.md with its wall
time), ``--seeds N``, ``--backend``, ``--model`` (repeatable) and writes ``results.json``,
``report.md`` and PNG figures (when matplotlib imports) into ``--out DIR``.

Modules:

| module        | what                                                                       |
| ------------- | -------------------------------------------------------------------------- |
| ``common``    | scales, model specs, seeds, machine info, training phases through         |
|               | ``training.train``, statistics, JSON / markdown writing, figure helpers   |
| ``domains``   | the built-in real-text domains of a fresh machine, ``--domain NAME=PATH``, |
|               | the by-file train / held-out split and its run-time disjointness check    |
| ``tasks``     | synthetic byte-level recall tasks with exact answers (passkey, MQAR)      |
| ``continual`` | ``experiment continual``: the forgetting matrix, BWT, the test-time-only  |
|               | setting (fast states carried vs reset)                                     |
| ``recall``    | ``experiment recall``: accuracy vs context length                          |
| ``compare``   | ``experiment compare``: held-out LM loss of the families (``--domain``)    |
| ``ablate``    | ``experiment ablate``: Table 6's switches through compare's runs           |
| ``toy_sweep`` | ``experiment toy-momentum``: the Eq. 53 toy over a grid                    |
| ``optimizers``| ``experiment optimizers``: M3 vs AdamW vs Muon vs the deep optimizers on a |
|               | small LM and a least-squares problem, lr swept on the training loss        |

``EXPERIMENTS`` names every command's module; each has a ``run(...)`` of the same shape (options,
``echo``) -> results dict, writing through ``common.write_outputs``.

Nothing here imports numpy, numba or matplotlib at import time of this package.
"""

EXPERIMENTS = {
    "continual": "nlref.experiments.continual",
    "recall": "nlref.experiments.recall",
    "toy-momentum": "nlref.experiments.toy_sweep",
    "compare": "nlref.experiments.compare",
    "ablate": "nlref.experiments.ablate",
    "optimizers": "nlref.experiments.optimizers",
}
