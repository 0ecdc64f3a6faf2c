"""Data layer: converted datasets (WebDataset shards or Zarr) streamed as random crops for training and read whole
for validation. Conversion lives in ``medmae.data.convert`` (CLI: ``tools/to_wds.py``).

Training: ``build_train_stream`` (one persistent, checkpointable stream of batches on the model's device; usage in
``medmae.data.stream``). ``build_train_loader`` is the older per-epoch loader, kept for its callers.
"""

from medmae.data.config import DataConfig, DatasetSource
from medmae.data.convert.manifest import read_manifest
from medmae.data.loaders import TrainLoader, build_train_loader, build_val_loader
from medmae.data.stream import TrainStream, build_train_stream

__all__ = [
    "DataConfig",
    "DatasetSource",
    "TrainLoader",
    "TrainStream",
    "build_train_loader",
    "build_train_stream",
    "build_val_loader",
    "read_manifest",
]
