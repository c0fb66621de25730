"""train/ckpt/decoder.py: a checkpoint file decoded from pieces, in any cut, equals the file
decoded whole; tensors that fit a target land in it (the same memory, nothing else allocated for
them); a malformed or short file never raises while fed, only from result()."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from test_codec import MALFORMED

from train.ckpt.codec import deserialize, serialize
from train.ckpt.decoder import Decoder


def _pieces(data: bytes, cuts: list[int]) -> list[torch.Tensor]:
    array = np.frombuffer(bytearray(data), dtype=np.uint8)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [torch.from_numpy(array[a:b].copy()) for a, b in itertools.pairwise(bounds)]


def _decode(file: str, data: bytes, cuts: list[int], targets=None):
    decoder = Decoder(file, len(data), targets)
    for piece in _pieces(data, cuts):
        decoder.feed(piece)
    return decoder.result()


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


MODEL = {
    "w": torch.randn(37, 5),
    "b": torch.randn(5).to(torch.bfloat16),
    "mask": torch.rand(9) > 0.5,
    "empty": torch.zeros(0, 3),
    "scalar": torch.tensor(3, dtype=torch.int64),
}
OPTIM = {
    "state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(37, 5)}, 1: {"step": torch.tensor(4.0)}},
    "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0, 1], "name": None}],
}


@pytest.mark.parametrize("file, obj", [("model.safetensors", MODEL), ("optim.safetensors", OPTIM)])
def test_any_cut_of_the_file_decodes_as_the_whole_file(file, obj) -> None:
    data = serialize(file, obj)
    rng = random.Random(0)
    cuts_list = [[], list(range(1, len(data))), [1, 7, 8, 9], [rng.randrange(len(data)) for _ in range(20)]]
    for cuts in cuts_list:
        _same(_decode(file, data, cuts), deserialize(file, data))


def test_tensors_that_fit_a_target_land_in_it_and_the_rest_in_fresh_memory() -> None:
    data = serialize("model.safetensors", MODEL)
    targets = {
        "w": torch.zeros(37, 5),  # fits: filled in place
        "b": torch.zeros(5),  # another dtype: not touched
        "mask": torch.zeros(3, 3, dtype=torch.bool),  # another shape: not touched
    }
    before = {k: t.clone() for k, t in targets.items()}
    got = _decode("model.safetensors", data, [100, 200])
    placed = _decode("model.safetensors", data, [100, 200], targets)
    assert placed["w"] is targets["w"] and torch.equal(targets["w"], MODEL["w"])
    for name in ("b", "mask"):
        assert placed[name] is not targets[name] and torch.equal(targets[name], before[name])
    _same(placed, got)


def test_a_non_safetensors_file_is_kept_whole_and_decoded_at_the_end() -> None:
    data = serialize("train.pt", {"step": 3})
    assert _decode("train.pt", data, [5, 50]) == {"step": 3}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_file_raises_only_from_result(name: str) -> None:
    data = MALFORMED[name]
    decoder = Decoder("model.safetensors", len(data))
    for piece in _pieces(data, [3, 9, 17]):
        decoder.feed(piece)  # never raises: the sender's chunks keep coming
    with pytest.raises(ValueError):
        decoder.result()


def test_too_few_or_too_many_bytes_are_an_error() -> None:
    data = serialize("model.safetensors", MODEL)
    short = Decoder("model.safetensors", len(data))
    short.feed(torch.from_numpy(np.frombuffer(bytearray(data[:-1]), np.uint8)))
    with pytest.raises(ValueError, match="bytes arrived"):
        short.result()
    long = Decoder("model.safetensors", len(data) - 1)
    long.feed(torch.from_numpy(np.frombuffer(bytearray(data), np.uint8)))
    with pytest.raises(ValueError, match="more than"):
        long.result()
