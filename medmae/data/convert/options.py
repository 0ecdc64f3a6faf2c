"""Converter options and the per-sample error type shared by the converter modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from medmae.config import Range, check_ranges

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
    spacing: Annotated[tuple[float, ...] | None, Range(gt=0)] = None
    """Target voxel spacing in mm (image linear, label nearest); None keeps the source spacing."""
    reorient: bool = True
    """Reorient volumes to RAS."""
    crop_foreground: bool = False
    """Crop each sample to the bounding box of its foreground (image above its minimum) plus fg_margin."""
    fg_margin: Annotated[int, Range(ge=0)] = 4
    """Voxels kept around the foreground box."""
    image_dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of images (labels are uint8, or uint16 above 255 classes)."""
    channels: Annotated[int | None, Range(ge=1)] = None
    """Expected image channels; None = inferred from the first datalist entry (or channel_suffixes), else 1."""
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Fraction of samples (of patients with group_col) put in the validation split when the input names none."""
    group_col: str | None = None
    """CSV input: column naming each image's patient; the validation split then keeps every patient on one side."""
    train_list: str | None = None
    """CSV input: text file of the image names (image_col values) that may be trained on (train_val_list.txt)."""
    test_list: str | None = None
    """CSV input: text file of the image names of the held-out test split (test_list.txt)."""
    seed: int = 0
    """Seed of the validation split and of the foreground points stored for label-balanced crops."""
    shard_size_mb: Annotated[float, Range(gt=0)] = 256.0
    """Target size of one tar shard in MB (a shard closes at the first sample past it)."""
    zarr_chunk: Annotated[int, Range(ge=1)] = 64
    """Zarr chunk edge in voxels (all channels of a block share a chunk)."""
    zarr_shard: Annotated[int, Range(ge=0)] = 0
    """Zarr shard edge in voxels (a multiple of zarr_chunk; 0 = no sharding, one file per chunk)."""
    workers: Annotated[int, Range(ge=0)] = 2
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
    fg_points: Annotated[int, Range(ge=0)] = 1024
    """Foreground voxel coordinates stored per sample for label-balanced crops without reading the label."""
    min_size: Annotated[int, Range(ge=1)] = 8
    """Smallest spatial size, in voxels along any axis after preprocessing, of a stored sample (smaller ones are
    refused as degenerate_shape; a size of 1 always is)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for an OUTPUT URL (endpoint, credentials); default: the backend's environment variables."""
    plan: dict | None = None
    """The ``tools/plan.py`` plan these options came from (file, choices and their rules), recorded in the manifest;
    it changes nothing by itself: its choices are already in the fields above."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims: must be 2 or 3, got {self.spatial_dims}")
        if len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window: expected (low, high) with low < high, got {self.ct_window}")
        if self.spacing is not None and len(self.spacing) not in (2, 3):
            raise ValueError(f"spacing: expected 2 or 3 positive values, got {self.spacing}")
        if self.zarr_shard % self.zarr_chunk:
            raise ValueError(
                f"zarr_shard: must be 0 or a multiple of zarr_chunk ({self.zarr_chunk}), got {self.zarr_shard}"
            )
        if any(c in self.prefix for c in "/. "):
            raise ValueError(f"prefix: must not contain '/', '.' or spaces, got {self.prefix!r}")
        if self.plan is not None and not isinstance(self.plan, dict):
            raise ValueError(f"plan: expected a mapping or None, got {type(self.plan).__name__}")
        if not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options: expected a mapping, got {self.storage_options!r}")
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
