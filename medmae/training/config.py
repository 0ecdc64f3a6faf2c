"""The job config: every component's section, plus the one function that derives batch arithmetic and lr.

A YAML file holds only what differs from these defaults; ``launch/*.py --config F key.sub=value ...`` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from medmae.config import Range, check_ranges
from medmae.data.config import DataConfig
from medmae.distributed.config import DistributedConfig
from medmae.models.registry import get_entry
from medmae.tasks import task_class


@dataclass
class RunConfig:
    name: str = "debug"
    """run name: the run directory under output_dir; re-running the same name resumes it"""
    output_dir: str = "runs"
    """where run directories (config, checkpoints, TensorBoard, exports) are written"""
    seed: int = 0
    """seed for weights, masking, crops and shuffling"""
    log_every: Annotated[int, Range(ge=1)] = 10
    """steps between console/TensorBoard scalar logs"""
    image_every: Annotated[int, Range(ge=0)] = 100
    """steps between TensorBoard reconstruction images (0 = never)"""
    checkpoint_every: Annotated[int, Range(ge=1)] = 100
    """steps between checkpoints (a final one is always written)"""
    keep_last: Annotated[int, Range(ge=1)] = 2
    """checkpoints kept on disk"""
    val_every: Annotated[int, Range(ge=0)] = 0
    """steps between validations (0 = only at the end; fine-tuning)"""
    probe_every: Annotated[int, Range(ge=0)] = 0
    """steps between online linear probes of the frozen encoder on labelled crops, on rank 0 (pretraining; 0 = off):
    probe/r2 in TensorBoard and metrics.jsonl, the best step in best_probe.json (see medmae/training/probe.py)"""
    probe_data: str = ""
    """labelled converted dataset the probe reads; empty = the training data's (data.path, or the first of
    data.datasets with labels)"""
    probe_crops: Annotated[int, Range(ge=8)] = 256
    """crops the probe embeds each time, cut once from up to 64 labelled volumes; bounds its time and memory"""

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a non-empty name without '/', got {self.name!r}")


@dataclass
class OptimConfig:
    base_lr: Annotated[float, Range(gt=0)] = 1.5e-4
    """lr per 256 samples: lr = base_lr × global_batch / 256 (MAE's rule)"""
    lr: Annotated[float | None, Range(gt=0)] = None
    """absolute peak lr; when set it replaces the base_lr scaling"""
    min_lr: Annotated[float, Range(ge=0)] = 0.0
    """floor of the cosine decay"""
    weight_decay: Annotated[float, Range(ge=0)] = 0.05
    """AdamW weight decay (never on norms, biases, position tables and tokens)"""
    betas: Annotated[tuple[float, float], Range(ge=0, lt=1)] = (0.9, 0.95)
    """AdamW betas"""
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    """linear warmup steps, then cosine decay to min_lr at max_steps"""
    layer_decay: Annotated[float, Range(gt=0, le=1)] = 1.0
    """layer-wise lr decay through the encoder's group_matcher (1.0 = off; fine-tuning uses ~0.75)"""
    grad_clip: Annotated[float, Range(ge=0)] = 0.0
    """max global gradient norm (0 = no clipping)"""

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        check_ranges(self)


@dataclass
class TrainConfig:
    max_steps: Annotated[int, Range(ge=1)] = 1000
    """optimizer steps in the whole run"""
    micro_batch: Annotated[int, Range(ge=1)] = 2
    """samples per worker per forward/backward"""
    global_batch: Annotated[int | None, Range(ge=1)] = None
    """samples per optimizer step over all workers (None = micro_batch × workers); sets gradient accumulation"""
    max_bad_steps: Annotated[int, Range(ge=0)] = 3
    """bad optimizer steps in a row (non-finite loss or gradient norm, or a loss spike) before the run stops with an
    error (it never checkpoints or exports such a state); they are counted in train/bad_steps"""
    loss_spike: Annotated[float, Range(ge=0)] = 1000.0
    """a step whose loss exceeds this many times the running mean of the good steps' losses is a bad step (0 = only
    non-finite steps are)"""
    compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "off"
    """torch.compile the model's training forward and loss as one full graph (medmae/training/compile.py):
    ``default`` (Inductor), ``reduce-overhead`` (plus CUDA graphs of forward and backward), ``max-autotune-no-
    cudagraphs`` (autotuned GEMMs). Off until bench/gpu_check.sh mfu measures it faster on a GPU
    (docs/performance.md)"""
    grad_checkpointing: bool = False
    """recompute encoder (and MAE decoder) blocks in backward to save activation memory; a runtime switch, so a
    resumed run may turn it on or off"""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.global_batch is not None and self.global_batch < self.micro_batch:
            raise ValueError(f"global_batch: {self.global_batch} is smaller than micro_batch {self.micro_batch}")


@dataclass
class JobConfig:
    task: str = "pretrain"
    """what is trained: a registered task (pretrain, segment, classify; see medmae/tasks)"""
    model: dict[str, Any] = field(default_factory=dict)
    """registered model name plus overrides of its config (img_size, depth, mask_ratio, ...)"""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    finetune: Any = field(default_factory=dict)
    """options of the task (pretrained encoder, sliding-window settings, ...): the keys depend on the task"""

    def __post_init__(self) -> None:
        spec = task_class(self.task)
        self.finetune = spec.parse_options(self.finetune)
        if self.dist.zero_stage == 3 and not spec.same_forwards_on_every_rank:
            raise ValueError(
                f"dist.zero_stage: 3 partitions parameters, so every rank must run the same forwards, but task "
                f"'{self.task}' gives ranks different work (whole-volume validation); use stage 0, 1 or 2"
            )
        if self.run.probe_every and self.dist.zero_stage == 3:
            raise ValueError(
                "run.probe_every: the probe runs the encoder on rank 0 alone, which ZeRO-3's partitioned parameters "
                "cannot; use dist.zero_stage 0, 1 or 2, or run.probe_every=0"
            )
        if "name" not in self.model:
            self.model = {"name": spec.default_model, **self.model}
        self.model = self._model_sized_by_data()
        try:
            spec.check_model(self.model["name"])
        except ValueError as e:
            raise ValueError(str(e)) from None
        if self.dist.elastic:  # Ray Train may start any count in the range: every one must keep the global batch
            for n in range(self.dist.min_workers or self.dist.num_workers, self.dist.num_workers + 1):
                derive(self, n)

    def _model_sized_by_data(self) -> dict[str, Any]:
        """One number, one key: the model's input size is ``data.roi_size``. ``model.img_size`` may repeat it (a
        resolved config does) but not differ from it, and the model's spatial dims must be the data's."""
        try:
            entry = get_entry(self.model["name"])
        except ValueError as e:
            raise ValueError(f"model.name: {e}") from None
        default = entry.defaults().get("img_size") or getattr(entry.config_cls, "img_size")  # noqa: B009
        if len(default) != self.data.spatial_dims:
            raise ValueError(
                f"model.name: {self.model['name']} is a {len(default)}D model but data.spatial_dims is "
                f"{self.data.spatial_dims}"
            )
        roi = list(self.data.roi_size)
        if "img_size" in self.model:
            given = list(self.model_config().img_size)  # validates the user's own value first, naming model.<key>
            if given != roi:
                raise ValueError(
                    f"model.img_size: {given} differs from data.roi_size {roi}; the model's input size is the crop "
                    "size, so set data.roi_size only"
                )
        sized = {**self.model, "img_size": roi}
        try:
            get_entry(sized["name"]).config(_prefix="model.", **{k: v for k, v in sized.items() if k != "name"})
        except ValueError as e:  # validates every override now, naming model.<key> (or data.roi_size for the size)
            msg = str(e)
            if msg.startswith("model.img_size") and "img_size" not in self.model:
                msg = "data.roi_size (the model's img_size)" + msg.removeprefix("model.img_size")
            raise ValueError(msg) from None
        return sized

    def model_config(self) -> Any:
        overrides = {k: v for k, v in self.model.items() if k != "name"}
        try:
            entry = get_entry(self.model["name"])
        except ValueError as e:
            raise ValueError(f"model.name: {e}") from None
        return entry.config(_prefix="model.", **overrides)


@dataclass(frozen=True)
class Derived:
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    lr: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
            "lr": self.lr,
        }


def derive(cfg: JobConfig, world_size: int) -> Derived:
    """Batch arithmetic and lr for ``world_size`` workers: the only place they are computed.

    The global batch is kept at every worker count (a resumed or resized elastic run trains with the same batch and
    lr): accumulation absorbs the change, and where the configured micro-batch does not divide, the largest smaller
    micro-batch that does is used (at the cost of more accumulation steps, never of a different global batch).
    """
    global_batch = cfg.train.global_batch or cfg.train.micro_batch * world_size
    micro = next((m for m in range(cfg.train.micro_batch, 0, -1) if global_batch % (m * world_size) == 0), None)
    if micro is None:
        raise ValueError(
            f"train.global_batch: {global_batch} cannot be split over {world_size} workers (not divisible); "
            + (f"dist.min_workers..num_workers allows {world_size} workers, so " if cfg.dist.elastic else "")
            + "choose a global batch divisible by every worker count the run may use"
        )
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch / 256
    return Derived(
        world_size=world_size,
        micro_batch=micro,
        grad_accum=global_batch // (micro * world_size),
        global_batch=global_batch,
        lr=lr,
    )
