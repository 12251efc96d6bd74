"""backends.py: the backend names once, the Backend of each name, its availability and its errors.

SPEC: SPEC.md#backends (the backends and what each passes the one driver), SPEC.md#fast-cpu,
SPEC.md#fast-gpu.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nlref
from nlref import backends, bench, config, training
from nlref.fast import model as fast_model
from nlref.fast import registry
from nlref.reference import model as ref

ROOT = Path(nlref.__file__).resolve().parent
SKIP_DIRS = {"tests", ".venv", ".numba_cache", "build", "nlref.egg-info", "__pycache__"}
# A tuple or list literal bound to a name ending in BACKENDS or DEVICES ...
NAMES_TUPLE = re.compile(r"^\s*\w*(BACKENDS|DEVICES)\s*(:[^=]*)?=\s*[\(\[]", re.M)
# ... or the three backend names written out in a row (a copy of backends.NAMES).
NAMES_LITERAL = re.compile(r"""["']reference["']\s*,\s*["']cpu["']\s*,\s*(["']torch["']\s*,\s*)?["']gpu["']""")


def _package_sources():
    for path in sorted(ROOT.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts[:-1]):
            yield path


def test_the_backend_names_are_written_once():
    # the patterns catch the tuples this issue removed (so the test can fail)
    for old in ('BACKENDS = ("reference", "cpu", "gpu")', 'DEVICES = ("cpu", "gpu")',
                'GPU_BACKENDS = ("gpu", "torch-cuda")', "BACKENDS = ('reference', 'cpu', 'torch', 'gpu', 'torch-cuda')"):
        assert NAMES_TUPLE.search(old) or NAMES_LITERAL.search(old), old
    assert NAMES_LITERAL.search('click.Choice(["reference", "cpu", "gpu"])')
    sources = list(_package_sources())
    assert ROOT / "backends.py" in sources and ROOT / "fast" / "registry.py" in sources and ROOT / "cli.py" in sources
    found = []
    for path in sources:
        text = path.read_text()
        for pattern in (NAMES_TUPLE, NAMES_LITERAL):
            if path.name == "backends.py" and path.parent == ROOT and pattern is NAMES_LITERAL:
                continue  # the one definition
            found += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in pattern.finditer(text)]
    assert not found, "backend names defined outside backends.py:\n" + "\n".join(found)
    assert backends.NAMES == ("reference", "cpu", "gpu")
    # the public aliases are backends.py's own tuples, not copies
    assert registry.BACKENDS is backends.NAMES and fast_model.DEVICES is backends.PORTS == ("cpu", "gpu")
    assert bench.CHOICES == backends.NAMES + backends.PEERS
    assert [b.name for b in map(backends.get, backends.NAMES)] == list(backends.NAMES)


@pytest.mark.parametrize("bad", ["tpu", "", "CPU", None, 3, ["cpu"]])
def test_get_names_the_choices(bad):
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of reference, cpu, gpu; got {bad!r}")):
        backends.get(bad)
    with pytest.raises(backends.BackendError):
        backends.get(bad)
    with pytest.raises(training.TrainingError, match="backend must be one of reference, cpu, gpu"):
        training.check_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of reference, cpu, gpu"):
        registry.ported(bad)
    with pytest.raises(ValueError, match="backend 'torch-cud' is not implemented"):
        bench.run(backends=("torch-cud",))


def test_fast_model_names_its_devices():
    with pytest.raises(ValueError, match="device must be one of cpu, gpu; got 'reference'"):
        fast_model.loss_and_grads({}, np.zeros((1, 2), dtype=np.int64), config.preset("transformer-tiny"),
                                  device="reference")


def test_each_backend_names_its_model_module():
    assert backends.get("reference").model is ref
    from nlref.fast.cpu import model as cpu
    from nlref.fast.gpu import model as gpu

    assert backends.get("cpu").model is cpu and backends.get("gpu").model is gpu
    assert [backends.get(n).device for n in backends.NAMES] == ["cpu", "cpu", "gpu"]
    for name in backends.NAMES:
        assert registry.load("model.loss_and_grads", name) is not None


def test_families():
    assert backends.get("reference").families() == config.FAMILIES
    assert backends.get("cpu").families() == config.FAMILIES  # every family ...
    from nlref.fast.cpu import model as cpu
    from nlref.fast.gpu import model as gpu

    fallback = backends.get("cpu").reference_layers()  # ... some layers by a counted reference fallback
    assert set(fallback) == {f for f, m in cpu.PORTED_LAYERS.items() if m is None} and "hope" not in fallback
    assert set(backends.get("gpu").families()) == set(gpu.FAMILIES)
    assert backends.get("gpu").reference_layers() == backends.get("reference").reference_layers() == ()
    missing = [f for f in config.FAMILIES if f not in gpu.FAMILIES]
    assert missing  # the linear families: the GPU port does not compute them yet
    with pytest.raises(backends.BackendError, match=re.escape(
            f"backend 'gpu' does not compute the {missing[0]!r} family yet (it computes "
            f"{', '.join(backends.get('gpu').families())}); use --backend cpu or --backend reference")):
        backends.get("gpu").check(missing[0])
    backends.get("cpu").check(missing[0])
    backends.get("reference").check(missing[0])


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_is_unavailable_without_cupy_and_says_why():
    ok, why = backends.get("gpu").available()
    assert not ok and "CuPy is not installed" in why
    with pytest.raises(backends.BackendError, match="backend 'gpu' needs CuPy and a CUDA device: CuPy is not "
                       "installed .*; use --backend cpu or --backend reference here"):
        backends.get("gpu").check("hope")


def test_gpu_availability_follows_the_device_and_the_namespace(monkeypatch):
    from nlref.fast.gpu import model as gpu
    from nlref.fast.gpu import namespace

    monkeypatch.setattr(gpu, "NAMESPACE", "cupy")
    monkeypatch.setattr(namespace, "cupy_available", lambda: (False, "CuPy sees no CUDA device"))
    assert backends.get("gpu").available() == (False, "CuPy sees no CUDA device")
    with pytest.raises(training.TrainingError, match="needs CuPy and a CUDA device: CuPy sees no CUDA device"):
        training.check_backend("gpu")
    monkeypatch.setattr(namespace, "cupy_available", lambda: (True, "NVIDIA H200"))
    assert backends.get("gpu").available() == (True, "NVIDIA H200")
    monkeypatch.setattr(gpu, "NAMESPACE", "numpy")  # the GPU port's code on the CPU (CI)
    monkeypatch.setattr(namespace, "cupy_available", lambda: pytest.fail("no device query under numpy"))
    ok, why = backends.get("gpu").available()
    assert ok and "NL_GPU_NAMESPACE=numpy" in why
    backends.get("gpu").check("titans")


def test_host_backends_are_available_here():
    assert backends.get("reference").available()[0]
    if importlib.util.find_spec("numba") is not None:
        assert backends.get("cpu").available() == (True, "Numba + BLAS on the CPU")
        assert backends.default() == training.default_backend() == "cpu"


def test_cpu_without_numba_says_why_and_the_default_is_the_reference(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    ok, why = backends.get("cpu").available()
    assert not ok and "Numba is not installed" in why
    with pytest.raises(backends.BackendError, match="backend 'cpu' needs Numba: .*; use --backend reference here"):
        backends.get("cpu").check()
    assert backends.default() == "reference"
    from nlref import bench as b

    with pytest.raises(b.NotAvailable, match="Numba is not installed"):
        b._backend("cpu")


def test_a_bad_cpu_setting_makes_the_cpu_backend_unavailable(tmp_path):
    code = ("from nlref import backends, training\n"
            "print(backends.get('cpu').available())\n"
            "try:\n    training.check_backend('cpu')\nexcept training.TrainingError as e:\n    print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items()} | {"NL_CPU_WORKERS": "fibres"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().splitlines()
    assert first.startswith("(False, ") and "NL_CPU_WORKERS='fibres': must be one of thread, process" in first
    assert second == "backend 'cpu': NL_CPU_WORKERS='fibres': must be one of thread, process"


def test_importing_backends_imports_neither_numpy_numba_nor_cupy(tmp_path):
    code = ("import sys\n"
            "from nlref import backends\n"
            "bs = [backends.get(n) for n in backends.NAMES]\n"
            "assert [b.on_device for b in bs] == [False, False, True]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'numba', 'cupy')\n"
            "             or m.startswith('nlref.fast') or m.startswith('nlref.reference')))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_host_arrays_stay_put_and_the_gpu_port_moves_them(monkeypatch):
    from nlref.fast.gpu import model as gpu

    cfg = config.preset("transformer-tiny")
    params = ref.init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 6))
    be = backends.get("reference")
    assert be.to_device(params) is params and be.to_host(params) is params
    assert be.optimizers() is importlib.import_module("nlref.reference.optimizers")
    be.synchronize()
    loss, grads = be.loss_and_grads(params, tokens, cfg)
    logits, _ = be.forward(params, tokens, cfg)
    monkeypatch.setattr(gpu, "NAMESPACE", "numpy")
    g = backends.get("gpu")
    on = g.to_device(params)
    assert on is not params and set(on) == set(params)
    g_loss, g_grads = g.loss_and_grads(on, tokens, cfg)
    g_logits, g_state = g.forward(on, tokens, cfg)
    g.synchronize()
    assert g_loss == loss  # over NumPy, the GPU port is the reference bit for bit
    host = g.to_host(g_grads)
    for k in grads:
        np.testing.assert_array_equal(host[k], grads[k], err_msg=k)
    np.testing.assert_array_equal(g.to_host(g_logits), logits)
    opt = g.optimizers().make("adamw", lr=1e-3)
    assert set(opt.update(on, g_grads, opt.init(on))[0]) == set(params)
