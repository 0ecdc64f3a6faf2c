"""Per-rank random streams and their checkpointed state.

Seeding torch and NumPy with ``run.seed`` on every rank would make every rank draw the same MAE masks and the
same drop-path decisions each step, so N workers would train on N copies of one draw. The trainer therefore seeds
``run.seed`` only for the model's initial weights (identical on every rank) and then gives each rank its own
stream, ``rank_seed(seed, rank)``. The states are stored per rank as JSON (base64 text, no pickle), CUDA included.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

from medmae.io import write_json_atomic

__all__ = ["RankState", "rank_seed", "seed_everything"]


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed for ``rank``'s stream, independent across ranks (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Python, NumPy, torch CPU and every CUDA device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA generators


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class RankState:
    """This process's generator states, saved as ``rank_state_<rank>.json`` inside a checkpoint's step folder."""

    @staticmethod
    def path(directory: str | Path, rank: int) -> Path:
        return Path(directory) / f"rank_state_{rank:05d}.json"

    @staticmethod
    def capture() -> dict:
        np_state = np.random.get_state()
        state = {
            "torch": _b64(torch.get_rng_state()),
            "numpy_keys": base64.b64encode(np_state[1].astype(np.uint32).tobytes()).decode(),
            "numpy_pos": int(np_state[2]),
            "python": json.dumps(random.getstate()),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = _b64(torch.cuda.get_rng_state())  # the current device: one GPU per rank
        return state

    @staticmethod
    def restore(state: dict) -> None:
        torch.set_rng_state(_tensor(state["torch"]))
        keys = np.frombuffer(base64.b64decode(state["numpy_keys"]), dtype=np.uint32)
        np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
        version, internal, gauss = json.loads(state["python"])
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_tensor(state["cuda"]))

    @classmethod
    def save(cls, directory: str | Path, rank: int, extra: dict | None = None) -> None:
        write_json_atomic(cls.path(directory, rank), {"rng": cls.capture(), **(extra or {})})

    @classmethod
    def load(cls, directory: str | Path, rank: int) -> dict | None:
        """Restore this rank's generators from ``directory``; returns the saved record, or None when absent."""
        path = cls.path(directory, rank)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        cls.restore(record["rng"])
        return record
