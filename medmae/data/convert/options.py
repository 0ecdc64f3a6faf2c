"""Converter options and the per-sample error type shared by the converter modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ConvertOptions", "SampleError"]


class SampleError(Exception):
    """A sample that cannot be converted; ``reason`` is a short machine-readable code recorded in errors.jsonl."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class ConvertOptions:
    format: Literal["wds", "zarr"] = "wds"
    """Output layout: WebDataset tar shards or one Zarr v3 group."""
    spatial_dims: int | None = None
    """3 for volumes, 2 for x-rays; None = 2 for a CSV input, else 3."""
    preset: Literal["ct", "mri", "xray", "none"] = "none"
    """Intensity preset: ct = clip to ct_window and scale to [0,1]; mri = per-channel z-score on non-zero voxels."""
    ct_window: tuple[float, ...] = (-175.0, 250.0)
    """HU window (low, high) of the ct preset."""
    spacing: tuple[float, ...] | None = None
    """Target voxel spacing in mm (image linear, label nearest); None keeps the source spacing."""
    reorient: bool = True
    """Reorient volumes to RAS."""
    crop_foreground: bool = False
    """Crop each sample to the bounding box of its foreground (image above its minimum) plus fg_margin."""
    fg_margin: int = 4
    """Voxels kept around the foreground box."""
    image_dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of images (labels are uint8, or uint16 above 255 classes)."""
    channels: int | None = None
    """Expected image channels; None = inferred from the first datalist entry (or channel_suffixes), else 1."""
    val_fraction: float = 0.0
    """Fraction of samples (of patients with group_col) put in the validation split when the input names none."""
    group_col: str | None = None
    """CSV input: column naming each image's patient; the validation split then keeps every patient on one side."""
    train_list: str | None = None
    """CSV input: text file of the image names (image_col values) that may be trained on (train_val_list.txt)."""
    test_list: str | None = None
    """CSV input: text file of the image names of the held-out test split (test_list.txt)."""
    seed: int = 0
    """Seed of the validation split and of the foreground points stored for label-balanced crops."""
    shard_size_mb: float = 256.0
    """Target size of one tar shard in MB (a shard closes at the first sample past it)."""
    zarr_chunk: int = 64
    """Zarr chunk edge in voxels (all channels of a block share a chunk)."""
    zarr_shard: int = 0
    """Zarr shard edge in voxels (a multiple of zarr_chunk; 0 = no sharding, one file per chunk)."""
    workers: int = 2
    """Parallel reader processes (0 = read in this process)."""
    prefix: str = ""
    """Shard name prefix: <prefix><split>-000000.tar."""
    images_dir: str | None = None
    """Folder input: subfolder holding the images (default imagesTr when present, else the folder itself)."""
    labels_dir: str | None = None
    """Folder input: subfolder holding labels with the image's file name (default labelsTr when present)."""
    label_suffix: str = "_seg"
    """Folder input without labels_dir: <key><label_suffix>.<ext> is the label of <key>.<ext>."""
    channel_suffixes: list[str] = field(default_factory=list)
    """Folder input: <key>_<suffix>.<ext> files form the channels of sample <key>, in this order (BraTS style)."""
    image_col: str = "image"
    """CSV input: column holding the image path."""
    label_cols: list[str] = field(default_factory=list)
    """CSV input: 0/1 label columns; empty = every column but image_col, or split label_col when given."""
    label_col: str | None = None
    """CSV input: one column of label names joined by label_sep (ChestX-ray14 'Finding Labels')."""
    label_sep: str = "|"
    """CSV input: separator of label names in label_col."""
    fg_points: int = 1024
    """Foreground voxel coordinates stored per sample for label-balanced crops without reading the label."""
    min_size: int = 8
    """Smallest spatial size, in voxels along any axis after preprocessing, of a stored sample (smaller ones are
    refused as degenerate_shape; a size of 1 always is)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for an OUTPUT URL (endpoint, credentials); default: the backend's environment variables."""

    def __post_init__(self) -> None:
        if self.spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims: must be 2 or 3, got {self.spatial_dims}")
        if len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window: expected (low, high) with low < high, got {self.ct_window}")
        if self.spacing is not None and (len(self.spacing) not in (2, 3) or min(self.spacing) <= 0):
            raise ValueError(f"spacing: expected 2 or 3 positive values, got {self.spacing}")
        if self.fg_margin < 0:
            raise ValueError(f"fg_margin: must be >= 0, got {self.fg_margin}")
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"channels: must be >= 1, got {self.channels}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb: must be > 0, got {self.shard_size_mb}")
        if self.zarr_chunk < 1:
            raise ValueError(f"zarr_chunk: must be >= 1, got {self.zarr_chunk}")
        if self.zarr_shard < 0 or (self.zarr_shard and self.zarr_shard % self.zarr_chunk):
            raise ValueError(
                f"zarr_shard: must be 0 or a multiple of zarr_chunk ({self.zarr_chunk}), got {self.zarr_shard}"
            )
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if any(c in self.prefix for c in "/. "):
            raise ValueError(f"prefix: must not contain '/', '.' or spaces, got {self.prefix!r}")
        if self.fg_points < 0:
            raise ValueError(f"fg_points: must be >= 0, got {self.fg_points}")
        if not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options: expected a mapping, got {self.storage_options!r}")
        if self.min_size < 1:
            raise ValueError(f"min_size: must be >= 1, got {self.min_size}")
        if self.group_col is not None and not self.group_col.strip():
            raise ValueError("group_col: must name a column, got an empty string")

    def preprocessing(self) -> dict:
        """The options that change stored voxels; recorded in the manifest and compared on resume."""
        return {
            "spatial_dims": self.spatial_dims,
            "preset": self.preset,
            "ct_window": list(self.ct_window) if self.preset == "ct" else None,
            "spacing": list(self.spacing) if self.spacing else None,
            "orientation": "RAS" if self.reorient and self.spatial_dims != 2 else None,
            "crop_foreground": self.crop_foreground,
            "fg_margin": self.fg_margin if self.crop_foreground else None,
            "image_dtype": self.image_dtype,
            "channels": self.channels,
        }
