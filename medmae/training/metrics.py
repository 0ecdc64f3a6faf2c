"""Training metrics kept on the device and read once per log interval (torchtitan's metrics processor).

Every step adds its loss and gradient norm to a few device tensors, with no host sync; :meth:`StepMetrics.read`
reduces them over ranks and copies them to the host in one transfer. Bad steps are counted here too (a non-finite
loss or gradient norm, or a loss ``train.loss_spike`` times the running mean of the good ones: a run diverging
through huge but finite losses is as lost as one that reached inf): how many in the interval, and the longest run of
consecutive ones, which the trainer compares with ``train.max_bad_steps``.
"""

from __future__ import annotations

import torch

from medmae.distributed import all_reduce_sum

__all__ = ["StepMetrics"]


class StepMetrics:
    """Sums over a log interval: ``loss`` (finite steps only), ``grad_norm``, steps, non-finite steps, the current
    and the longest run of consecutive non-finite steps."""

    def __init__(self, device: torch.device, loss_spike: float = 0.0) -> None:
        self.device, self.loss_spike = device, loss_spike
        self.run = torch.zeros((), device=device)  # consecutive bad steps up to now: carried across intervals
        self.mean = torch.zeros((), device=device)  # running mean of the good steps' losses (0: none yet)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, device=self.device)  # loss, grad_norm, non-finite steps, longest bad run
        self.steps = 0

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> None:
        """Add one optimizer step (device ops only)."""
        loss = loss.detach().float()
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=self.device, dtype=torch.float32)
        bad = ~torch.isfinite(loss) | ~torch.isfinite(norm)
        if self.loss_spike > 0:
            bad = bad | ((self.mean > 0) & (loss > self.loss_spike * self.mean))
        self.mean = torch.where(bad, self.mean, torch.where(self.mean > 0, 0.9 * self.mean + 0.1 * loss, loss))
        bad = bad.float()
        self.run = (self.run + 1) * bad
        step = torch.stack([torch.where(bad > 0, 0.0, loss), torch.where(bad > 0, 0.0, norm), bad, self.run])
        self.sums[:3] += step[:3]
        self.sums[3] = torch.maximum(self.sums[3], step[3])
        self.steps += 1

    def read(self, world_size: int, stop: bool = False) -> dict[str, float]:
        """Collective, one host sync: the interval's mean loss and gradient norm over finite steps and ranks, the
        non-finite steps, the longest run of them and the run still going. A non-finite loss on one rank makes the
        all-reduced gradients, so the norm, non-finite on every rank: the counts agree across ranks (their mean).
        ``stop`` (this rank was asked to stop) comes back as ``stop`` > 0 on every rank when any rank was."""
        flag = torch.tensor([float(stop)], device=self.device)
        out = torch.cat([self.sums, self.run.reshape(1), flag])
        loss, norm, bad, longest, run, stops = (v / world_size for v in all_reduce_sum(out).tolist())  # the sync
        good = max(1.0, self.steps - bad)
        return {
            "loss": loss / good,
            "grad_norm": norm / good,
            "bad_steps": bad,
            "bad_run": longest,
            "bad_now": run,
            "stop": stops,
        }
