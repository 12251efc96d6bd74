"""Checkpoints: exact round trip, atomic writes, clear errors (SPEC.md#checkpoints)."""

import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nlref import SPEC_VERSION, checkpoint
from nlref.checkpoint import CheckpointError


def _params(rng, dtype=np.float64):
    return {
        "embed": rng.standard_normal((5, 3)).astype(dtype),
        "blocks": [{"w": rng.standard_normal((3, 3)).astype(dtype), "b": np.zeros(3, dtype)} for _ in range(2)],
    }


def _opt_state(rng):
    return {"step": 7, "lr": 1e-3, "m": {"embed": rng.standard_normal((5, 3))}, "t": np.float64(3.5),
            "levels": (np.arange(4), None, "adam"), 3: True}


def _save(path, rng, **overrides):
    kw = dict(params=_params(rng), opt_state=_opt_state(rng),
              config={"model": {"preset": "tiny", "d_model": 3}, "train": {"steps": 10}}, step=7,
              rng_state={"bit_generator": "PCG64", "state": {"state": 2**100 + 3, "inc": 5}},
              data_position={"epoch": 1, "index": 4})
    kw.update(overrides)
    checkpoint.save_checkpoint(path, **kw)
    return kw


def _assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    elif isinstance(a, np.ndarray | np.generic):
        assert type(a) is type(b) and a.dtype == b.dtype and np.shape(a) == np.shape(b)
        assert np.array_equal(a, b, equal_nan=True)
    else:
        assert type(a) is type(b) and a == b


def test_round_trip_is_exact(tmp_path, rng):
    path = tmp_path / "ck.safetensors"
    kw = _save(path, rng)
    ck = checkpoint.load_checkpoint(path, expect_config={"preset": "tiny"})
    _assert_tree_equal(ck.params, kw["params"])
    _assert_tree_equal(ck.opt_state, kw["opt_state"])
    assert ck.step == 7 and ck.config == kw["config"] and ck.rng_state == kw["rng_state"]
    assert ck.data_position == kw["data_position"] and ck.spec_version == SPEC_VERSION
    # The file is plain safetensors: other readers see the tensors and the metadata.
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert "params.embed" in f.keys()
        assert json.loads(f.metadata()["config"]) == kw["config"]


@given(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
                  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
       st.floats(allow_nan=False), st.integers(-2**70, 2**70))
def test_round_trip_property(tmp_path_factory, arr, x, n):
    path = tmp_path_factory.mktemp("ck") / "p.safetensors"
    checkpoint.save_checkpoint(path, params={"a": arr, "nested": [arr, {"x": x}]}, opt_state={"n": n},
                               config={}, step=0)
    ck = checkpoint.load_checkpoint(path)
    _assert_tree_equal(ck.params, {"a": arr, "nested": [arr, {"x": x}]})
    assert ck.opt_state == {"n": n}


def test_crash_mid_write_leaves_previous_checkpoint_intact(tmp_path, rng, monkeypatch):
    path = tmp_path / "ck.safetensors"
    kw = _save(path, rng, step=3)
    before = path.read_bytes()

    def crash(f, payload):
        f.write(payload[: len(payload) // 2])
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(checkpoint, "_write_all", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(path, np.random.default_rng(9), step=4)
    assert path.read_bytes() == before
    assert checkpoint.load_checkpoint(path).step == 3
    _assert_tree_equal(checkpoint.load_checkpoint(path).params, kw["params"])
    assert os.listdir(tmp_path) == ["ck.safetensors"]  # the temporary file was removed


@pytest.mark.parametrize("cut", [0, 5, 100, -1, -200])
def test_truncated_checkpoint_gives_clear_error(tmp_path, rng, cut):
    path = tmp_path / "ck.safetensors"
    _save(path, rng)
    payload = path.read_bytes()
    path.write_bytes(payload[:cut] if cut >= 0 else payload[: len(payload) + cut])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        checkpoint.load_checkpoint(path)


def test_flipped_byte_in_a_tensor_is_detected(tmp_path, rng):
    path = tmp_path / "ck.safetensors"
    _save(path, rng)
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0x40  # inside the last tensor's data
    path.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load_checkpoint(path)


def test_other_files_and_models_give_clear_errors(tmp_path, rng):
    from safetensors.numpy import save_file

    missing = tmp_path / "none.safetensors"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load_checkpoint(missing)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.ones(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a nested-learning checkpoint"):
        checkpoint.load_checkpoint(foreign)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        checkpoint.load_checkpoint(text)
    path = tmp_path / "ck.safetensors"
    _save(path, rng)
    with pytest.raises(CheckpointError, match="another model.*d_model"):
        checkpoint.load_checkpoint(path, expect_config={"preset": "tiny", "d_model": 4})
    params = checkpoint.load_checkpoint(path).params
    other = _params(np.random.default_rng(0), dtype=np.float32)
    with pytest.raises(CheckpointError, match="another model"):
        checkpoint.check_params_match(params, other, path)
    del other["embed"]
    with pytest.raises(CheckpointError, match="unexpected params.embed"):
        checkpoint.check_params_match(params, other, path)
    checkpoint.check_params_match(params, _params(rng), path)  # same structure: no error


def test_spec_version_mismatch_is_refused(tmp_path, rng, monkeypatch):
    import nlref

    path = tmp_path / "ck.safetensors"
    monkeypatch.setattr(nlref, "SPEC_VERSION", "0.0-old")
    _save(path, rng)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="spec version"):
        checkpoint.load_checkpoint(path)


def test_a_compatible_spec_version_loads_and_an_older_one_is_refused(tmp_path, rng, monkeypatch):
    """0.3 only adds mechanisms (SPEC.md "Changes"): a 0.2 checkpoint loads; 0.1's CMS writes
    computed another function, so a 0.1 checkpoint is refused."""
    import nlref

    assert nlref.SPEC_VERSION in nlref.COMPATIBLE_SPECS and "0.2" in nlref.COMPATIBLE_SPECS
    for version, loads in (("0.2", True), ("0.1", False)):
        path = tmp_path / f"ck-{version}.safetensors"
        monkeypatch.setattr(nlref, "SPEC_VERSION", version)
        _save(path, rng)
        monkeypatch.undo()
        if loads:
            assert checkpoint.load_checkpoint(path).spec_version == version
        else:
            with pytest.raises(CheckpointError, match="spec version '0.1'"):
                checkpoint.load_checkpoint(path)


def test_unstorable_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        checkpoint.save_checkpoint(tmp_path / "x.safetensors", params={"f": object()}, opt_state={},
                                   config={}, step=0)
    with pytest.raises(TypeError, match="cannot store dtype"):
        checkpoint.save_checkpoint(tmp_path / "x.safetensors", params={"c": np.ones(2, complex)},
                                   opt_state={}, config={}, step=0)
    assert not list(tmp_path.iterdir())
