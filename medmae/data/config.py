"""``DataConfig``: what the training stream and the validation loader read, and how training crops and augments it.

Every key is read by the one training path (``medmae.data.stream``) or by validation; keys of the removed
per-epoch and per-crop loaders are refused with a note saying so (``DataConfig.removed_keys``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from medmae.config import Range, broadcast_size, check_ranges

__all__ = ["SELECTION_SPLIT", "DataConfig", "DatasetSource"]

SELECTION_SPLIT = "selection"
"""The split ``build_val_loader`` serves from the training volumes ``data.select_*`` carves out (never trained on)."""


@dataclass
class DatasetSource:
    """One of several converted datasets read by one run (``data.datasets``)."""

    path: str
    """Converted dataset (tools/to_wds.py OUTPUT): a folder or fsspec URL holding manifest.json."""
    weight: Annotated[float, Range(gt=0)] = 1.0
    """Relative share of training volumes (and so of crops) drawn from this dataset."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.path:
            raise ValueError("path: must name a converted dataset")


@dataclass
class DataConfig:
    removed_keys: ClassVar[dict[str, str]] = {
        "loader": "the resident stream is the one training path",
        "samples_per_epoch": "the training stream is endless; train.max_steps sets the run length",
        "shuffle_buffer": "only the removed per-epoch loader read it",
        "crops_per_volume": "a volume gives resident_reuse crops on average while it is resident",
        "crop_shuffle_buffer": "only the removed per-crop loader read it",
    }
    """Keys of loaders that no longer exist, with the reason, for the error that refuses them."""

    path: str = ""
    """Converted dataset (tools/to_wds.py OUTPUT): a folder or fsspec URL holding manifest.json."""
    datasets: list[DatasetSource] = field(default_factory=list)
    """Several converted datasets with sampling weights, instead of ``path`` (training only; validation reads
    ``path``). They must agree on channels, spatial dims and intensity preset."""
    allow_mixed_spacing: bool = False
    """datasets: accept datasets resampled to different voxel spacings."""
    resident_gib: Annotated[float, Range(ge=0)] = 0.0
    """Memory for the resident volumes per rank, GiB; 0 = 25% of the device's memory (CUDA) or 25% of
    the machine's RAM / local ranks (CPU). When all training volumes fit, every rank holds all of them and never
    refills; else it streams its share through the set, capped at what that share needs."""
    resident_reuse: Annotated[float, Range(ge=1)] = 64.0
    """Streaming (not all volumes resident): mean crops taken from a volume while it is resident; the set swaps in
    batch/this volumes per batch, so the loader workers must decode (model crops/s)/this volumes per second."""
    format: Literal["wds", "zarr"] = "wds"
    """Storage read: WebDataset tar shards or a Zarr group; either is read a whole volume at a time."""
    spatial_dims: int = 3
    """3 for volumes, 2 for x-rays; must match the dataset."""
    roi_size: tuple[int, ...] = (96, 96, 96)
    """Crop size in voxels, one entry per spatial dim (or one for all); volumes smaller than it are zero-padded."""
    crop: Literal["random", "pos_neg", "resized"] = "random"
    """random = uniform (pretraining), pos_neg = label-balanced (fine-tuning), resized = random resized crop (2D)."""
    pos_fraction: Annotated[float, Range(ge=0, le=1)] = 0.5
    """pos_neg: probability that a crop is centred on a foreground voxel."""
    resized_min_scale: Annotated[float, Range(gt=0, le=1)] = 0.2
    """resized: smallest crop area as a fraction of the image area."""
    num_workers: Annotated[int, Range(ge=0)] = 2
    """DataLoader worker processes per rank reading volumes (0 = read in the training process)."""
    prefetch_factor: Annotated[int, Range(ge=1)] = 2
    """Volumes each worker reads ahead."""
    train_fraction: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Fraction of training volumes used (label-efficiency runs); 1.0 = all."""
    train_count: Annotated[int | None, Range(ge=1)] = None
    """Exact number of training volumes used; overrides train_fraction."""
    subset_seed: int = 0
    """Seed choosing the training subset, independent of the training seed."""
    train_subset: list[str] = field(default_factory=list)
    """Explicit training volume keys used (a designed study: each labelled volume named, none drawn twice);
    overrides train_fraction / train_count. Each must be a training key outside the selection split."""
    select_count: Annotated[int | None, Range(ge=1)] = None
    """Training volumes (patients, where the manifest records them) taken out of training and served as the
    'selection' split, on which fine-tuning validates and picks its best checkpoint, so that the validation split
    is scored only once, by the picked model (results.json -> test). Overrides select_fraction."""
    select_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Fraction of the training volumes (patients) carved out as the selection split; 0 = none."""
    select_seed: int = 0
    """Seed choosing the selection split; independent of subset_seed, so every trial of a sweep selects on the
    same volumes whatever its labelled subset."""
    flip_prob: Annotated[float, Range(ge=0, le=1)] = 0.1
    """Probability of a flip along each spatial axis."""
    rot90_prob: Annotated[float, Range(ge=0, le=1)] = 0.1
    """Probability of a random 90-degree rotation in the plane of the first two spatial axes (square ROI only)."""
    intensity_shift: Annotated[float, Range(ge=0)] = 0.1
    """Random intensity offset in [-x, x] (applied with intensity_prob); 0 disables."""
    intensity_scale: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """Random intensity factor 1 + [-x, x] (applied with intensity_prob); 0 disables."""
    intensity_prob: Annotated[float, Range(ge=0, le=1)] = 0.5
    """Probability of each intensity augmentation."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for URL paths (credentials, endpoint), passed as is."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: must be 2 or 3, got {self.spatial_dims}")
        self.roi_size = broadcast_size(self.roi_size, self.spatial_dims)  # 96 or [96]: a cube (square in 2D)
        if len(self.roi_size) != self.spatial_dims or min(self.roi_size) < 1:
            raise ValueError(f"roi_size: expected {self.spatial_dims} positive sizes, got {self.roi_size}")
        if self.crop == "resized" and self.spatial_dims != 2:
            raise ValueError("crop: 'resized' is for 2D images (spatial_dims=2)")
        if self.path and self.datasets:
            raise ValueError("datasets: set either path or datasets, not both")
        for i, d in enumerate(self.datasets):
            if not isinstance(d, DatasetSource):
                raise ValueError(f"datasets[{i}]: expected a mapping with path and weight, got {d!r}")
        if len({d.path for d in self.datasets}) != len(self.datasets):
            raise ValueError("datasets: the same path is listed twice")
        if self.selects and self.datasets:
            raise ValueError("select_count: the selection split comes from data.path; data.datasets is for pretraining")
        if len(set(self.train_subset)) != len(self.train_subset):
            raise ValueError(f"train_subset: lists a key twice: {self.train_subset}")

    @property
    def selects(self) -> bool:
        """Whether a selection split is carved out of the training volumes."""
        return self.select_count is not None or self.select_fraction > 0

    def check_manifest(self, path: str, manifest: dict[str, Any]) -> None:
        """``ValueError`` naming the key when the dataset at ``path`` is not what this config reads."""
        if manifest["format"] != self.format:
            raise ValueError(f"data.format: '{self.format}' but {path} holds a '{manifest['format']}' dataset")
        if manifest["spatial_dims"] != self.spatial_dims:
            raise ValueError(
                f"data.spatial_dims: {self.spatial_dims} but {path} holds {manifest['spatial_dims']}D samples"
            )
