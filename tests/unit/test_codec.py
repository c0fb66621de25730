"""Checkpoint file formats: nested state in safetensors, exact round trips, no pickle."""

from __future__ import annotations

import random

import pytest
import safetensors.torch
import torch

from train.ckpt.codec import deserialize, serialize


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
