"""Whole decoded volumes held on the model's device, and batched crops + augmentation cut from them.

Memory: one flat image buffer (``C x capacity`` voxels, float16) and one flat uint8 label buffer (``capacity``),
used as a ring: a volume is written at the head; the oldest volumes are evicted first (FIFO), so the ring order and
the eviction order agree and no compaction is ever needed. Host-side tables (slot -> offset, shape, foreground
points, dataset, key) drive both the parameter sampler and the gather.

Gather, two ways over the same data (chosen per device by measurement, see ``default_gather``):

- ``index``: one advanced-indexing op for the whole batch. A crop is ``C x rx x ry`` rows of ``rz`` contiguous
  voxels; ``ring.as_strided((N - rz + 1, rz), (1, 1))`` views every such row, and indexing it with the
  ``(B, C, rx, ry)`` row offsets gathers the batch. Flips of axes 0, 1 and the 90-degree turns permute rows only,
  so they are folded into the row offsets (a table per (flip0, flip1, k)); a flip of the last axis is one
  ``flip`` of the crops that have it.
- ``slices``: a copy of each crop's box (contiguous rows, memcpy speed), then flips/turns of the crops that have
  them. A Python loop per crop, which on a CPU beats the gather (measured: bench/bench_data.py).

Intensity augmentation (``image * scale + offset``) and the cast to the output dtype follow in one pass.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from medmae.data.sampling import CropParams

__all__ = ["ResidentSet", "default_gather"]

MAX_FG = 1024  # foreground points kept per volume (the converter stores up to --fg-points, default 1024)


def default_gather(device: torch.device) -> str:
    """``index`` on CUDA, ``slices`` on a CPU. Measured for 96^3 crops with the default augmentation: H200, batch
    128, index 103k crops/s vs slices 24k (kernel launches per crop); 2-core CPU, one thread, slices ~1,500 crops
    per CPU second vs index ~400 (the CPU gather kernel moves a row at a time)."""
    return "index" if device.type == "cuda" else "slices"


class ResidentSet:
    """A FIFO ring of whole volumes on ``device`` and the batched crop over them."""

    def __init__(
        self,
        *,
        capacity: int,
        channels: int,
        spatial_dims: int,
        roi,
        device: torch.device,
        label: str | None = None,
        num_targets: int = 0,
        max_slots: int = 4096,
        max_fg: int = MAX_FG,
        image_dtype: torch.dtype = torch.float16,
        gather: str | None = None,
        resized: bool = False,
    ):
        self.capacity, self.channels, self.spatial_dims, self.device = capacity, channels, spatial_dims, device
        self.roi = tuple(roi) + (1,) * (3 - spatial_dims)
        self.label_kind, self.resized = label, resized
        self.gather = gather or default_gather(device)
        if self.gather not in ("index", "slices"):
            raise ValueError(f"gather: {self.gather!r} is not one of ['index', 'slices']")
        self.image = torch.zeros(channels * capacity, dtype=image_dtype, device=device)
        self.label = torch.zeros(capacity, dtype=torch.uint8, device=device) if label == "segmentation" else None
        self.targets = (
            torch.zeros(max_slots, num_targets, dtype=torch.float32, device=device)
            if label == "classification"
            else None
        )
        self.offset = np.zeros(max_slots, dtype=np.int64)
        self.shape = np.ones((max_slots, 3), dtype=np.int64)
        self.fg = np.zeros((max_slots, max_fg, 3), dtype=np.int32)  # 0 wide when crops ignore foreground
        self.nfg = np.zeros(max_slots, dtype=np.int64)
        self.dataset = np.zeros(max_slots, dtype=np.int64)
        self.keys: list[str | None] = [None] * max_slots
        self.fifo: deque[int] = deque()
        self.free = list(range(max_slots - 1, -1, -1))
        self.head = 0
        self.inserted = self.evicted = 0
        self._live: np.ndarray | None = None
        self._tables = self._turn_tables() if self.gather == "index" else None

    # ---- bookkeeping
    @property
    def nbytes(self) -> int:
        """Device bytes held (buffers and per-slot tables)."""
        return sum(t.numel() * t.element_size() for t in (self.image, self.label, self.targets) if t is not None)

    def used_bytes(self) -> int:
        per_vox = self.channels * self.image.element_size() + (1 if self.label is not None else 0)
        return int(self.nvox[list(self.fifo)].sum()) * per_vox if self.fifo else 0

    @property
    def nvox(self) -> np.ndarray:
        return self.shape.prod(axis=1)

    def __len__(self) -> int:
        return len(self.fifo)

    def live(self) -> np.ndarray:
        """Resident slots, oldest first (cached until the set changes)."""
        if self._live is None:
            self._live = np.fromiter(self.fifo, dtype=np.int64, count=len(self.fifo))
        return self._live

    def _evict(self) -> None:
        slot = self.fifo.popleft()
        self.keys[slot] = None
        self.free.append(slot)
        self.evicted += 1

    def _place(self, n: int) -> int:
        """Offset for ``n`` voxels at the head, evicting the oldest volumes in the way (FIFO = ring order)."""
        if n > self.capacity:
            raise ValueError(
                f"data.resident_gib: a volume of {n} voxels does not fit the resident set of "
                f"{self.capacity} voxels; raise resident_gib"
            )
        head = self.head
        if head + n > self.capacity:  # wrap: everything past the old head is the oldest; it goes first
            while self.fifo and self.offset[self.fifo[0]] >= head:
                self._evict()
            head = 0
        while self.fifo and self._overlaps(self.fifo[0], head, n):
            self._evict()
        if not self.free:
            self._evict()
        return head

    def _overlaps(self, slot: int, start: int, n: int) -> bool:
        lo = self.offset[slot]
        return lo < start + n and start < lo + self.nvox[slot]

    def would_evict(self, n: int) -> bool:
        """Whether inserting ``n`` voxels now would push out a resident volume (``_place`` without evicting)."""
        if not self.free:
            return True
        head = self.head
        if head + n > self.capacity:
            if any(self.offset[s] >= head for s in self.fifo):
                return True
            head = 0
        return any(self._overlaps(s, head, n) for s in self.fifo)

    # ---- insert
    def insert(self, item: dict, *, slot: int | None = None, offset: int | None = None) -> int:
        """Copy a decoded volume (``VolumeSource`` item; tensors, pinned on CUDA) in; returns its slot.
        ``slot``/``offset`` place it exactly (restoring a checkpointed set, in FIFO order)."""
        image = item["image"]
        spatial = tuple(image.shape[1:]) + (1,) * (3 - self.spatial_dims)
        n = int(np.prod(spatial))
        if image.shape[0] != self.channels:
            raise ValueError(f"volume {item['key']}: {image.shape[0]} channels, the resident set holds {self.channels}")
        if offset is None:
            offset = self._place(n)
            slot = self.free.pop()
        else:
            assert slot is not None, "an exact placement names both slot and offset"
            self.free.remove(slot)
        c = self.channels
        self.image[c * offset : c * (offset + n)].copy_(image.reshape(-1), non_blocking=True)
        label = item.get("label")
        if self.label is not None:
            assert label is not None, "a labelled resident set gets labelled volumes"
            self.label[offset : offset + n].copy_(label.reshape(-1), non_blocking=True)
        elif self.targets is not None:
            self.targets[slot].copy_(label, non_blocking=True)
        fg = np.asarray(item["fg"], dtype=np.int64).reshape(-1, self.spatial_dims)[: self.fg.shape[1]]
        self.fg[slot, : len(fg), : self.spatial_dims] = fg
        self.fg[slot, : len(fg), self.spatial_dims :] = 0
        self.nfg[slot] = len(fg)
        self.offset[slot], self.shape[slot] = offset, spatial
        self.dataset[slot], self.keys[slot] = int(item["dataset"]), item["key"]
        self.fifo.append(slot)
        self.head = offset + n
        self.inserted += 1
        self._live = None
        return slot

    # ---- crop
    def _turn_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Source (x, y) of each output (i, j) for every (flip0, flip1, k): the same torch ops MONAI applies
        (``flip``, then ``rot90`` on axes (0, 1)) run on a grid of coordinates."""
        rx, ry = self.roi[0], self.roi[1]
        grid = torch.stack(torch.meshgrid(torch.arange(rx), torch.arange(ry), indexing="ij"))  # (2, rx, ry)
        tables = []
        for f0 in (0, 1):
            for f1 in (0, 1):
                for k in range(4):
                    t = grid
                    if f0:
                        t = t.flip(1)
                    if f1:
                        t = t.flip(2)
                    if k and rx == ry:
                        t = torch.rot90(t, k, (1, 2))
                    tables.append(t)
        tab = torch.stack(tables).to(self.device)  # (16, 2, rx, ry)
        return tab[:, 0].contiguous(), tab[:, 1].contiguous()

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":  # pinned, so the copy is queued without waiting for the model's step
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def crop(self, p: CropParams, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The batch: ``image`` (B, C, *roi) ``dtype``; ``label`` (B, 1, *roi) int64 or (B, K) float32."""
        if self.device.type != "cpu":
            return self._crop(p, dtype)
        # One intra-op thread: these memory-bound copies ran 6x slower (and burnt 10x the CPU time) with torch's 2
        # OpenMP threads on a shared 2-core machine; on a CPU the model's own ops keep their threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._crop(p, dtype)
        finally:
            torch.set_num_threads(threads)

    def _crop(self, p: CropParams, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.resized:
            out, lab = self._crop_resized(p, dtype)
        elif self.gather == "index":
            out, lab = self._crop_index(p, dtype)
        else:
            out, lab = self._crop_slices(p, dtype)
        batch = {"image": out}
        if self.targets is not None:
            batch["label"] = self.targets[self._to_device(p.slot)]
        elif lab is not None:
            batch["label"] = lab
        if self.spatial_dims == 2:
            batch = {k: v.squeeze(-1) if k == "image" or v.ndim == 5 else v for k, v in batch.items()}
        return batch

    def _views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        o, sh = int(self.offset[slot]), tuple(int(s) for s in self.shape[slot])
        n, c = int(np.prod(sh)), self.channels
        img = self.image[c * o : c * (o + n)].view(c, *sh)
        lab = self.label[o : o + n].view(1, *sh) if self.label is not None else None
        return img, lab

    @staticmethod
    def _spatial_op(flip: np.ndarray, k: int) -> tuple[list[int], bool]:
        """MONAI's flips then ``rot90(k)`` on axes (0, 1) of a (C, X, Y, Z) crop as one ``flip(dims)`` and an
        optional transpose: torch's rot90 is flip(Y).T for k=1, flip(X, Y) for k=2, flip(X).T for k=3, and two
        flips of one axis cancel."""
        dims = {1 + d for d in np.flatnonzero(flip)}
        dims ^= ({2}, {1, 2}, {1})[k - 1] if k else set()
        return sorted(dims), bool(k % 2)

    def _place_crop(self, out: torch.Tensor, box: torch.Tensor, flip: np.ndarray, k: int) -> None:
        """``out`` <- the augmented ``box``: the flip reads the (float16) box once; the copy casts."""
        dims, transpose = self._spatial_op(flip, k)
        if dims:
            box = box.flip(dims)
        out.copy_(box.transpose(1, 2) if transpose else box)

    @staticmethod
    def _intensity(p: CropParams, out: torch.Tensor) -> None:
        for i in np.flatnonzero((p.scale != 1) | (p.offset != 0)):  # one pass: offset + scale * crop
            torch.add(torch.tensor(float(p.offset[i]), dtype=out.dtype), out[i], alpha=float(p.scale[i]), out=out[i])

    def _crop_slices(self, p: CropParams, dtype: torch.dtype):
        b, (rx, ry, rz) = len(p.slot), self.roi
        out = torch.empty((b, self.channels, rx, ry, rz), dtype=dtype, device=self.device)
        lab = torch.empty((b, 1, rx, ry, rz), dtype=torch.int64, device=self.device) if self.label is not None else None
        for i, (slot, (x, y, z)) in enumerate(zip(p.slot.tolist(), p.start.tolist())):
            img, lv = self._views(slot)
            k = int(p.rot[i])
            self._place_crop(out[i], img[:, x : x + rx, y : y + ry, z : z + rz], p.flip[i], k)
            if lab is not None and lv is not None:
                self._place_crop(lab[i], lv[:, x : x + rx, y : y + ry, z : z + rz], p.flip[i], k)
        self._intensity(p, out)
        return out, lab

    def _crop_index(self, p: CropParams, dtype: torch.dtype):
        b, c, rz = len(p.slot), self.channels, self.roi[2]
        sh = self.shape[p.slot]
        n = sh.prod(axis=1)
        combo = p.flip[:, 0] * 8 + p.flip[:, 1] * 4 + p.rot
        # per crop: image base, channel stride, x stride, y stride, z start, label base, table index
        host = np.stack(
            [
                c * self.offset[p.slot],
                n,
                sh[:, 1] * sh[:, 2],
                sh[:, 2],
                p.start[:, 2],
                self.offset[p.slot],
                combo,
                p.start[:, 0],
                p.start[:, 1],
            ],
            1,
        ).astype(np.int64)
        base, cs, sx, sy, z0, lbase, combo_t, x0, y0 = self._to_device(host).unbind(1)
        assert self._tables is not None, "built for the indexing gather"
        tx, ty = self._tables
        v = lambda t: t.view(b, 1, 1)  # noqa: E731
        rows = (v(x0) + tx[combo_t]) * v(sx) + (v(y0) + ty[combo_t]) * v(sy) + v(z0)  # (B, rx, ry)
        chan = torch.arange(c, device=self.device)
        img_rows = (base[:, None] + chan[None] * cs[:, None])[:, :, None, None] + rows[:, None]  # (B, C, rx, ry)
        img = self.image.as_strided((self.image.numel() - rz + 1, rz), (1, 1))[img_rows]  # (B, C, rx, ry, rz)
        lab = None
        if self.label is not None:
            lab = self.label.as_strided((self.label.numel() - rz + 1, rz), (1, 1))[(v(lbase) + rows)[:, None]]
        zflip = np.flatnonzero(p.flip[:, 2])
        if len(zflip):
            zi = self._to_device(zflip)
            img[zi] = img[zi].flip(-1)
            if lab is not None:
                lab[zi] = lab[zi].flip(-1)
        out = torch.empty(img.shape, dtype=dtype, device=self.device)
        if (p.scale != 1).any() or (p.offset != 0).any():
            ab = self._to_device(np.stack([p.scale, p.offset], 1)).view(b, 2, 1, 1, 1, 1)
            if self.device.type == "cuda":  # one pass, the float16 read cast in the kernel
                torch.addcmul(ab[:, 1], img, ab[:, 0], out=out)
            else:  # CPU kernels cast mixed dtypes through a temporary: cast once, then in place
                out.copy_(img).mul_(ab[:, 0]).add_(ab[:, 1])
        else:
            out.copy_(img)
        return out, lab.long() if lab is not None else None

    def _crop_resized(self, p: CropParams, dtype: torch.dtype):
        """2D random resized crops: antialiased bilinear resize of each box (no batched op antialiases; a
        ``grid_sample`` batch would alias where the box shrinks by 4x)."""
        b, (rh, rw, _) = len(p.slot), self.roi
        out = torch.empty((b, self.channels, rh, rw, 1), dtype=dtype, device=self.device)
        assert p.size is not None, "resized crops carry their box sizes"
        for i, (slot, (top, left, _), (h, w)) in enumerate(zip(p.slot.tolist(), p.start.tolist(), p.size.tolist())):
            img, _ = self._views(slot)
            patch = img[None, :, top : top + h, left : left + w, 0].float()
            resized = F.interpolate(patch, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            self._place_crop(out[i], resized[0, ..., None], p.flip[i], int(p.rot[i]))
        self._intensity(p, out)
        return out, None
