"""Every random number generator a training step can touch, as a weights_only-loadable state."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture(device: torch.device | None = None) -> dict:
    """Python, NumPy, torch CPU and - for a CUDA ``device`` - that device's generator.

    Only this rank's own GPU: get_rng_state_all() would create a CUDA context on every GPU of the
    node in every rank, and could not be restored on a node with fewer GPUs.
    """
    state: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    return state


# pack()'s layout: int64 words, then the torch (and CUDA) generator bytes. Fixed in size for one
# torch build and device type, so every rank's fits one buffer of the same size: that lets the
# ranks' states be gathered by a collective that runs beside the step loop (snapshot.py).
_MT_WORDS = 625  # Python's Mersenne Twister state: 624 words and the position


def pack(state: dict) -> bytes:
    """A capture()d state as bytes (no pickle): unpack() gives back an equal state."""
    version, words, gauss = state["python"]
    s = state["numpy"]
    if version != 3 or len(words) != _MT_WORDS or s["kind"] != "MT19937" or len(s["keys"]) != _MT_WORDS - 1:
        raise ValueError("an RNG state of an unknown layout")
    cpu = state["torch"].numpy().tobytes()
    cuda = state["cuda"].cpu().numpy().tobytes() if "cuda" in state else b""
    header = [len(cpu), len(cuda) if "cuda" in state else -1, gauss is not None, s["pos"], s["has_gauss"]]
    ints = np.array([*header, *words, *s["keys"].tolist()], dtype=np.int64)
    floats = np.array([gauss or 0.0, s["gauss"]], dtype=np.float64)
    return ints.tobytes() + floats.tobytes() + cpu + cuda


def unpack(data: bytes) -> dict:
    """pack()'s bytes as the state capture() gave; ValueError if they are not such bytes."""
    n_ints = 5 + _MT_WORDS + _MT_WORDS - 1
    if len(data) < n_ints * 8 + 16:
        raise ValueError("RNG state bytes too short")
    ints = np.frombuffer(data, dtype=np.int64, count=n_ints)
    gauss, np_gauss = np.frombuffer(data, dtype=np.float64, count=2, offset=n_ints * 8).tolist()
    cpu_len, cuda_len, has_py_gauss, pos, has_gauss = ints[:5].tolist()
    rest = data[n_ints * 8 + 16 :]
    if cpu_len < 0 or len(rest) != cpu_len + max(cuda_len, 0):
        raise ValueError("RNG state bytes of the wrong length")
    words = ints[5 : 5 + _MT_WORDS].tolist()
    state: dict = {
        "python": (3, tuple(words), gauss if has_py_gauss else None),
        "torch": _byte_tensor(rest[:cpu_len]),
    }
    if cuda_len >= 0:
        state["cuda"] = _byte_tensor(rest[cpu_len:])
    state["numpy"] = {
        "kind": "MT19937",
        "keys": torch.from_numpy(ints[5 + _MT_WORDS :].copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(np_gauss),
    }
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def restore(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            (s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"])
        )


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def check(state: object, device: torch.device | None = None) -> None:
    """ValueError unless ``state`` is one capture()d: each part is loaded into a scratch
    generator, so the live ones are never touched by a state that does not fit."""
    try:
        if not isinstance(state, dict):
            raise TypeError("not a map")
        random.Random().setstate(state["python"])
        torch.Generator().set_state(state["torch"])
        if "numpy" in state:
            s = state["numpy"]
            keys = s["keys"].numpy().astype("uint32")
            np.random.RandomState().set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["gauss"]))
        if "cuda" in state:
            if not (isinstance(state["cuda"], torch.Tensor) and state["cuda"].dtype == torch.uint8):
                raise TypeError("the CUDA state is not a byte tensor")
            if device is not None and device.type == "cuda":
                torch.Generator(device).set_state(state["cuda"])
    except Exception as e:  # whatever a malformed state makes these raise
        raise ValueError(f"an RNG state does not load ({type(e).__name__}: {str(e)[:100]})") from None
