"""Data layer: converted datasets (WebDataset shards or Zarr) read as one endless stream of training crops on the
model's device, and whole for validation. Conversion lives in ``medmae.data.convert`` (CLI: ``tools/to_wds.py``).

One training path: ``build_train_stream`` (``stream``: how a crop reaches the model is told there). Validation:
``build_val_loader`` (``validation``). Both read through ``storage``, the one reader per storage format.
"""

from medmae.data.config import SELECTION_SPLIT, DataConfig, DatasetSource
from medmae.data.convert.manifest import read_manifest
from medmae.data.stream import TrainStream, build_train_stream
from medmae.data.validation import build_val_loader

__all__ = [
    "SELECTION_SPLIT",
    "DataConfig",
    "DatasetSource",
    "TrainStream",
    "build_train_stream",
    "build_val_loader",
    "read_manifest",
]
