"""Training metrics kept on the device and read once per log interval (torchtitan's metrics processor).

Every step adds its loss and gradient norm to a few device tensors, with no host sync; :meth:`StepMetrics.read`
reduces them over ranks and copies them to the host in one transfer. Non-finite steps are counted here too: how
many in the interval, and the longest run of consecutive ones, which the trainer compares with
``train.max_bad_steps``.
"""

from __future__ import annotations

import torch

from medmae.distributed import all_reduce_sum

__all__ = ["StepMetrics"]


class StepMetrics:
    """Sums over a log interval: ``loss`` (finite steps only), ``grad_norm``, steps, non-finite steps, the current
    and the longest run of consecutive non-finite steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.run = torch.zeros((), device=device)  # consecutive non-finite steps up to now: carried across intervals
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, device=self.device)  # loss, grad_norm, non-finite steps, longest bad run
        self.steps = 0

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> None:
        """Add one optimizer step (device ops only)."""
        loss = loss.detach().float()
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=self.device, dtype=torch.float32)
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
        self.run = (self.run + 1) * bad
        step = torch.stack([torch.where(bad > 0, 0.0, loss), torch.where(bad > 0, 0.0, norm), bad, self.run])
        self.sums[:3] += step[:3]
        self.sums[3] = torch.maximum(self.sums[3], step[3])
        self.steps += 1

    def read(self, world_size: int) -> dict[str, float]:
        """Collective, one host sync: the interval's mean loss and gradient norm over finite steps and ranks, the
        non-finite steps, the longest run of them and the run still going. A non-finite loss on one rank makes the
        all-reduced gradients, so the norm, non-finite on every rank: the counts agree across ranks (their mean)."""
        out = torch.cat([self.sums, self.run.reshape(1)])
        loss, norm, bad, longest, run = (v / world_size for v in all_reduce_sum(out).tolist())  # the sync
        good = max(1.0, self.steps - bad)
        return {"loss": loss / good, "grad_norm": norm / good, "bad_steps": bad, "bad_run": longest, "bad_now": run}
