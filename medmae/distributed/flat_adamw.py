"""``FlatAdamW``: the DeepSpeed engine's client optimizer, with the gradient norm, clipping and the skip of a
non-finite step done on the device, in a number of kernels that does not grow with the number of parameters.

DeepSpeed is told to do none of that work itself (``deepspeed_config``: clipping 0, ``compute_grad_norm`` off, no
overflow check): each of those costs it a kernel or a host sync per parameter tensor (docs/performance.md). One
``step()``, whatever the model:

- ``norm = sqrt(sum(_foreach_norm(grads)^2))`` over the few tensors DeepSpeed hands over, all-reduced over the
  data-parallel group when each rank holds a disjoint partition (ZeRO-1/2);
- ``found_inf = !isfinite(norm)``: the fused kernel then leaves parameters and moments untouched and ``step`` is
  reverted (torch's ``_fused_adamw_`` as ``GradScaler`` drives it), so a non-finite step is skipped with no sync;
- ``grad_scale = max(1, (norm + 1e-6) / max_norm)``: the kernel divides the gradients by it, which is DeepSpeed's
  clipping (``clip_coef = max_norm / (norm + 1e-6)`` when below 1) at no extra pass;
- one ``_fused_adamw_`` per (weight decay, lr scale) class, the lr a device tensor refreshed only when it changes.

Two layouts. ``single_group`` (ZeRO-1/2): DeepSpeed's ZeRO optimizer steps its client once per param group with only
that group's gradients present, so a global norm needs DeepSpeed to see one group; FlatAdamW hands it one group
sorted by class and finds each class's slices of the flat partition through DeepSpeed's fragment map
(``param._hp_mapping``). Otherwise (ZeRO-0) each param group is a class. The state keys are torch AdamW's, so
DeepSpeed's checkpoints and universal conversion read it unchanged. ZeRO-3 has no fragment map and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["FlatAdamW"]


class FlatAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused) owning the norm, clipping and non-finite skip; see the module docstring.

    Groups may carry ``lr_scale`` (layer-wise decay). ``group["lr"]`` stays a Python float (DeepSpeed reads and
    saves it): in ``single_group`` mode the base lr, each class running at ``lr * lr_scale``; otherwise used as set.
    ``grad_norm`` (last step, before clipping) and ``skipped_steps`` are device tensors, read once per log step.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_grad_norm: float = 0.0,
        single_group: bool = False,
    ) -> None:
        groups = [dict(g) for g in params]
        for g in groups:
            g["params"] = list(g["params"])
            g.setdefault("weight_decay", weight_decay)
            g.setdefault("lr_scale", 1.0)
        self.single_group = single_group
        self._class_of: dict[int, int] = {}
        if single_group:
            self._classes = list(dict.fromkeys((float(g["weight_decay"]), float(g["lr_scale"])) for g in groups))
            ordered = []
            for ci, c in enumerate(self._classes):
                for g in groups:
                    if (float(g["weight_decay"]), float(g["lr_scale"])) == c:
                        for p in g["params"]:
                            self._class_of[id(p)] = ci
                            ordered.append(p)
            self._module_params = ordered  # the model's parameters, in the order DeepSpeed flattens them
            groups = [{"params": ordered, "weight_decay": 0.0, "lr_scale": 1.0}]
        else:
            self._module_params = []
            self._classes = [(float(g["weight_decay"]), float(g["lr_scale"])) for g in groups]
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self._n_groups = len(self.param_groups)
        self.max_grad_norm = float(max_grad_norm)
        self.grads_partitioned = False
        self.dp_group: Any = None
        self._segments_key: Any = None
        self._segments: dict[int, list[tuple[int, int, int]]] = {}
        self._lr: Tensor | None = None
        self._lr_seen: list[Any] = []
        self.grad_norm: Tensor | None = None
        self.skipped_steps: Tensor | None = None

    def configure_data_parallel(self, group: Any = None, *, grads_partitioned: bool) -> None:
        """``grads_partitioned``: each rank steps a disjoint slice (ZeRO-1/2), so the squared norms are summed over
        ``group``; False where every rank holds the whole all-reduced gradient (ZeRO-0)."""
        self.dp_group, self.grads_partitioned = group, grads_partitioned

    # DeepSpeed's engine reads this after a step it did not wrap (ZeRO-0): a device tensor, read by no one else.
    @property
    def _global_grad_norm(self) -> Tensor | None:
        return self.grad_norm

    def _refresh_lr(self, device: torch.device) -> None:
        """The float lrs as one device tensor, rewritten (one ``fill_`` per class) only when they changed."""
        if self._lr is None or self._lr.device != device:
            self._lr = torch.zeros(len(self._classes), dtype=torch.float32, device=device)
            self._lr_seen = [None] * len(self._classes)
        for ci, (_, scale) in enumerate(self._classes):
            lr = self.param_groups[0]["lr"] * scale if self.single_group else self.param_groups[ci]["lr"]
            if self._lr_seen[ci] != lr:
                self._lr[ci].fill_(lr)
                self._lr_seen[ci] = lr

    def _build_segments(self, flat: list[Tensor]) -> None:
        """Single group: for each flat tensor DeepSpeed steps, its (class, start, numel) slices, from the fragment
        map DeepSpeed keeps per model parameter; rebuilt when the flat tensors change (a universal load)."""
        key = tuple((id(p), p.data_ptr(), p.numel()) for p in flat)
        if key == self._segments_key:
            return
        own = {id(p) for p in self._module_params}
        mapped = [p for p in self._module_params if getattr(p, "_hp_mapping", None) is not None]
        self._segments = {}
        for fp in flat:
            if id(fp) in own:  # not flattened (no ZeRO wrapper): the parameter is its own segment
                self._segments[id(fp)] = [(self._class_of[id(fp)], 0, fp.numel())]
                continue
            lo, hi = fp.data_ptr(), fp.data_ptr() + fp.numel() * fp.element_size()
            ranges = []
            for lp in mapped:
                m = lp._hp_mapping
                if lo <= m.hp_fragment.data_ptr() < hi:
                    a = m.get_hp_fragment_address()
                    ranges.append((a.start, a.numel, self._class_of[id(lp)]))
            merged: list[tuple[int, int, int]] = []  # (class, start, numel); DeepSpeed's padding is in none
            for start, numel, ci in sorted(ranges):
                if merged and merged[-1][0] == ci and merged[-1][1] + merged[-1][2] == start:
                    merged[-1] = (ci, merged[-1][1], merged[-1][2] + numel)
                else:
                    merged.append((ci, start, numel))
            if not merged:
                raise RuntimeError("FlatAdamW: a flat partition without DeepSpeed's fragment map (ZeRO-3 is refused)")
            self._segments[id(fp)] = merged
        self._segments_key = key

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise NotImplementedError("FlatAdamW: no closure")
        if len(self.param_groups) != self._n_groups:
            raise RuntimeError("FlatAdamW: stepped with a subset of its param groups; use single_group=True")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        device = params[0].device
        self._refresh_lr(device)
        norms = torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float32)
        sq = torch.stack(norms).square().sum()
        if self.grads_partitioned and dist.is_initialized() and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(sq, group=self.dp_group)
        norm = sq.sqrt()
        found_inf = (~torch.isfinite(norm)).float()
        grad_scale = torch.clamp_min((norm + 1e-6) / self.max_grad_norm, 1.0) if self.max_grad_norm > 0 else None
        self.grad_norm = norm
        self.skipped_steps = found_inf.clone() if self.skipped_steps is None else self.skipped_steps.add_(found_inf)
        for p in params:  # torch AdamW's state keys and shapes: DeepSpeed's checkpoints read them
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1.0)
        buckets: list[tuple[list, list, list, list, list]] = [([], [], [], [], []) for _ in self._classes]
        if self.single_group:
            self._build_segments(params)
            for p in params:
                s = self.state[p]
                for ci, start, n in self._segments[id(p)]:
                    whole = start == 0 and n == p.numel()
                    tensors = (p, p.grad, s["exp_avg"], s["exp_avg_sq"])
                    for bucket, t in zip(buckets[ci], tensors):
                        bucket.append(t if whole else t.view(-1).narrow(0, start, n))
                    buckets[ci][4].append(s["step"])
        else:
            for ci, g in enumerate(self.param_groups):
                for p in g["params"]:
                    if p.grad is not None:
                        s = self.state[p]
                        for bucket, t in zip(buckets[ci], (p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"])):
                            bucket.append(t)
        beta1, beta2 = self.defaults["betas"]
        assert self._lr is not None
        for ci, (ps, gs, m1, m2, st) in enumerate(buckets):
            if ps:
                torch._fused_adamw_(
                    ps,
                    gs,
                    m1,
                    m2,
                    [],
                    st,
                    lr=self._lr[ci],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=self._classes[ci][0],
                    eps=self.defaults["eps"],
                    amsgrad=False,
                    maximize=False,
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
        torch._foreach_sub_(steps, [found_inf] * len(steps))  # a skipped step does not count
