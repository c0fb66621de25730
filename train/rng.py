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
