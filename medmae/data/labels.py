"""Label conventions shared by training, evaluation and prediction.

BraTS in the Medical Segmentation Decathlon labels 1 edema, 2 non-enhancing tumour, 3 enhancing tumour. The
evaluated regions are whole tumour WT = {1, 2, 3}, tumour core TC = {2, 3} and enhancing tumour ET = {3}. (The
SelfMedMAE code maps ET to label 2, which is the non-enhancing core.)
"""

from __future__ import annotations

import numpy as np
import torch

BRATS_REGIONS = ("WT", "TC", "ET")
_REGION_LABELS = ((1, 2, 3), (2, 3), (3,))


def brats_regions(label: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """MSD BraTS labels ``(..., *S)`` with a leading singleton channel or none -> ``(3, *S)`` WT/TC/ET masks.

    A batch ``(B, 1, *S)`` gives ``(B, 3, *S)``. The result is float for tensors (loss targets), uint8 for arrays.
    """
    if isinstance(label, torch.Tensor):
        lab = label.squeeze(-4) if label.ndim >= 4 and label.shape[-4] == 1 else label
        out = torch.stack([torch.isin(lab, torch.tensor(v, device=lab.device)) for v in _REGION_LABELS], dim=-4)
        return out.float()
    lab = label[..., 0, :, :, :] if label.ndim >= 4 and label.shape[-4] == 1 else label
    return np.stack([np.isin(lab, v) for v in _REGION_LABELS], axis=-4).astype(np.uint8)


def regions_to_brats(regions: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Binary WT/TC/ET masks ``(3, *S)`` -> MSD labels ``(*S)``: 3 in ET, else 2 in TC, else 1 in WT, else 0."""
    wt, tc, et = (regions[i] > 0 for i in range(3))
    if isinstance(regions, torch.Tensor):
        out = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    else:
        out = np.zeros(regions.shape[1:], dtype=np.uint8)
    out[wt] = 1
    out[tc] = 2
    out[et] = 3
    return out
