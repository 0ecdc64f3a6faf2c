"""Data layer: converted datasets (WebDataset shards or Zarr) streamed as random crops for training and read whole
for validation. Conversion lives in ``medmae.data.convert`` (CLI: ``tools/to_wds.py``)."""

from medmae.data.config import DataConfig
from medmae.data.convert.manifest import read_manifest
from medmae.data.loaders import TrainLoader, build_train_loader, build_val_loader

__all__ = ["DataConfig", "TrainLoader", "build_train_loader", "build_val_loader", "read_manifest"]
