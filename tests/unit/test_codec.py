"""Checkpoint file formats: nested state in safetensors, exact round trips, no pickle."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import safetensors.torch
import torch

from train.ckpt.codec import SKELETON, deserialize, serialize


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    state = opt.state_dict()
    back = deserialize("optim.safetensors", serialize("optim.safetensors", state))
    assert (
        back["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
        or back["param_groups"] == state["param_groups"]
    )
    assert set(back["state"]) == set(state["state"])  # int keys stay ints
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            assert torch.equal(back["state"][pid][name], value)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back)  # loads into a real optimizer


def test_rng_and_python_values_round_trip():
    random.seed(3)
    obj = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "floats": [0.1, 1e-300, float("inf")],
        "none": None,
        "flag": True,
        "nested": {"a": (1, [2, {"b": torch.zeros(0)}])},
    }
    back = deserialize("train.safetensors", serialize("train.safetensors", obj))
    assert back["python"] == obj["python"] and isinstance(back["python"], tuple)
    random.setstate(back["python"])
    assert torch.equal(back["torch"], obj["torch"])
    assert back["floats"] == obj["floats"] and back["none"] is None and back["flag"] is True
    assert back["nested"]["a"][0] == 1 and back["nested"]["a"][1][1]["b"].numel() == 0


def test_flat_weights_are_plain_safetensors_a_user_can_load(tmp_path):
    weights = {"w": torch.randn(3, 3), "b": torch.arange(3)}
    path = tmp_path / "model.safetensors"
    path.write_bytes(serialize("model.safetensors", weights))
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_nested_state_is_readable_without_project_code(tmp_path):
    path = tmp_path / "optim.safetensors"
    path.write_bytes(serialize("optim.safetensors", {"state": {0: {"exp_avg": torch.ones(2)}}}))
    assert torch.equal(safetensors.torch.load_file(path)["/state/0/exp_avg"], torch.ones(2))


def test_objects_that_are_not_data_are_refused():
    class Code:
        pass

    with pytest.raises(TypeError, match="cannot store Code"):
        serialize("train.safetensors", {"x": Code()})


# -- a file is parsed as untrusted input ----------------------------------------------------------


def _blob(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _t(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _skeleton(node: object) -> bytes:
    return _blob({"__metadata__": {SKELETON: json.dumps(node)}, "/x": _t("F32", [1], 0, 4)}, bytes(4))


MALFORMED = {
    "shorter than a header": b"\x01\x00",
    "header length past the end": (10**6).to_bytes(8, "little") + b"{}",
    "header length huge": (2**63).to_bytes(8, "little") + b"{}",
    "header not JSON": _blob(None, raw_header=b"\xff{not json"),
    "header a list": _blob([1, 2]),
    "entry not an object": _blob({"w": [1]}),
    "unknown dtype": _blob({"w": _t("C64", [1], 0, 8)}, bytes(8)),
    "dtype not a string": _blob({"w": {**_t("F32", [1], 0, 4), "dtype": ["F32"]}}, bytes(4)),
    "offsets past the data": _blob({"w": _t("F32", [4], 0, 16)}, bytes(8)),
    "offsets reversed": _blob({"w": _t("U8", [0], 4, 0)}, bytes(4)),
    "offsets overlap": _blob({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)),
    "gap between tensors": _blob({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)),
    "trailing bytes": _blob({"a": _t("F32", [1], 0, 4)}, bytes(8)),
    "shape does not fit the bytes": _blob({"w": _t("F32", [3], 0, 8)}, bytes(8)),
    "negative dimension": _blob({"w": _t("F32", [-1, -2], 0, 8)}, bytes(8)),
    "boolean offsets": _blob({"w": _t("U8", [1], 0, 1) | {"data_offsets": [False, True]}}, bytes(1)),
    "metadata not strings": _blob({"__metadata__": {SKELETON: {"v": 1}}}),
    "skeleton names a missing tensor": _skeleton({"t": "/nope"}),
    "skeleton node with two keys": _skeleton({"t": "/x", "v": 1}),
    "skeleton dict of non-pairs": _skeleton({"d": [1, 2]}),
    "skeleton unknown kind": _skeleton({"z": 1}),
    "skeleton value not a scalar": _skeleton({"v": {"a": 1}}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_safetensors_are_refused(name):
    with pytest.raises(ValueError):
        deserialize("model.safetensors", MALFORMED[name])


def test_well_formed_edge_cases_still_load():
    empty = _blob({})
    assert deserialize("model.safetensors", empty) == {}
    zero = _blob({"z": _t("F32", [0, 3], 0, 0), "a": _t("I64", [1], 0, 8)}, (7).to_bytes(8, "little"))
    back = deserialize("model.safetensors", zero)
    assert back["z"].shape == (0, 3) and back["a"].item() == 7
    state = {"a": torch.arange(5, dtype=torch.int16), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    assert all(
        torch.equal(deserialize("m.safetensors", serialize("m.safetensors", state))[k], state[k])
        for k in state
    )


def test_pt_files_load_weights_only(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(pickle.UnpicklingError):
        deserialize("train.pt", serialize("train.pt", {"x": Payload()}))
    assert not marker.exists()


def test_rng_states_pack_into_bytes_of_one_size_and_back() -> None:
    """The save gathers every rank's RNG states in one buffer of a fixed size (snapshot.py)."""
    import numpy as np

    from train import rng

    sizes = set()
    for seed, gauss in [(1, False), (2, True)]:
        rng.seed_all(seed)
        if gauss:  # Python's and NumPy's cached Gaussian are part of the state
            random.gauss(0, 1)
            np.random.standard_normal()
        state = rng.capture()
        data = rng.pack(state)
        sizes.add(len(data))
        back = rng.unpack(data)
        assert back["python"] == state["python"] and torch.equal(back["torch"], state["torch"])
        assert torch.equal(back["numpy"]["keys"], state["numpy"]["keys"])
        assert {k: v for k, v in back["numpy"].items() if k != "keys"} == {
            k: v for k, v in state["numpy"].items() if k != "keys"
        }
        rng.check(back)
    assert len(sizes) == 1
    for bad in (b"", data[:-1], data + b"x"):
        with pytest.raises(ValueError):
            rng.unpack(bad)
