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


def test_given_a_device_the_untargeted_tensors_are_made_there_and_scalars_stay_on_the_host() -> None:
    # "meta" stands in for a GPU here (none on this machine): what is placed where is the point;
    # tests/gpu/check.sh resumes on a real one.
    optim = {
        "state": {
            0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(5, 3), "exp_avg_sq": torch.rand(5, 3)}
        },
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    data = serialize("optim.safetensors", optim)
    decoder = Decoder("optim.safetensors", len(data), None, torch.device("meta"))
    for piece in _pieces(data, [3, 50, len(data) // 2]):
        decoder.feed(piece)
    out = decoder.result()
    state = out["state"][0]
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
    assert state["exp_avg"].shape == (5, 3) and state["exp_avg"].dtype == torch.float32
    assert state["step"].device.type == "cpu" and state["step"].item() == 7.0
    assert decoder._places is not None and out["param_groups"] == optim["param_groups"]


def test_a_cpu_device_changes_nothing() -> None:
    optim = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.randn(4, 4)}}, "param_groups": []}
    data = serialize("optim.safetensors", optim)
    decoder = Decoder("optim.safetensors", len(data), None, torch.device("cpu"))
    decoder.feed(torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.uint8)))
    _same(decoder.result(), deserialize("optim.safetensors", data))


@pytest.mark.parametrize("with_targets", [False, True])
def test_bytes_read_straight_into_their_slot_decode_alike_and_are_not_copied_again(
    with_targets: bool,
) -> None:
    """As LocalStorage.stream(into=decoder.slot) feeds it: where the decoder names the memory the
    next bytes belong in, they are read there, and feed() of that very memory copies nothing."""
    weights = {"a": torch.randn(300), "b": torch.randn(7, 5), "c": torch.zeros(0), "d": torch.arange(9.0)}
    data = serialize("model.safetensors", weights)
    targets = {k: torch.empty_like(v) for k, v in weights.items()} if with_targets else None
    decoder = Decoder("model.safetensors", len(data), targets)
    got, slotted, buf = 0, 0, bytearray(64)
    while got < len(data):
        slot = decoder.slot(got)
        target = slot if slot is not None else memoryview(buf)
        n = min(len(target), len(data) - got)
        target[:n] = data[got : got + n]
        slotted += n if slot is not None else 0
        decoder.feed(torch.from_numpy(np.frombuffer(target[:n], dtype=np.uint8)))
        got += n
    out = decoder.result()
    _same(out, weights)
    assert slotted > 0.8 * 4 * (300 + 35 + 9)  # all but the first buffer's worth landed in place
    if with_targets:
        assert all(out[k] is targets[k] for k in weights)


@pytest.mark.parametrize(
    "file, obj, targets",
    [
        ("model.safetensors", MODEL, {"w": torch.zeros(37, 5)}),  # a target, fresh memory, an empty tensor
        ("optim.safetensors", OPTIM, None),
        ("train.pt", {"step": 3, "rng": list(range(50))}, None),  # kept whole
    ],
)
def test_any_range_of_a_decoded_file_is_given_back_byte_for_byte(file, obj, targets) -> None:
    """What a sender builds its chunks from: the header kept, the tensors that hold the rest."""
    data = serialize(file, obj)
    decoder = Decoder(file, len(data), targets)
    for piece in _pieces(data, [5, 60, 61, 200]):
        decoder.feed(piece)
    decoder.result()
    rng = random.Random(1)
    ranges = [(0, len(data)), (0, 1), (len(data) - 1, 1), (0, 8), (7, 2)]
    starts = [rng.randrange(len(data)) for _ in range(200)]
    ranges += [(a, rng.randrange(1, len(data) - a + 1)) for a in starts]
    for at, n in ranges:
        into = torch.full((n,), 0xAB, dtype=torch.uint8)
        decoder.copy_out(at, into)
        assert into.numpy().tobytes() == data[at : at + n], (at, n)


def test_a_file_never_decoded_gives_nothing_back() -> None:
    data = serialize("model.safetensors", MODEL)
    decoder = Decoder("model.safetensors", len(data))
    decoder.feed(_pieces(data, [4])[0])  # the header never completed
    with pytest.raises(ValueError, match="never decoded"):
        decoder.copy_out(0, torch.empty(10, dtype=torch.uint8))
