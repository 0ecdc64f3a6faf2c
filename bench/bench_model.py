"""Train-step time and activation memory: our MAE ViT-B/16 3D vs MONAI's MaskedAutoEncoderViT, side by side.

    python bench/bench_model.py          # ViT-B/16 at 96³, batch 2: fp32 and bf16 on CPU (+ CUDA bf16 if present)
    python bench/bench_model.py --quick  # small sizes, seconds: checks that the bench runs

Activation memory is the bytes autograd saves for backward (counted with saved-tensor hooks, so it is the same on
CPU and GPU); on CUDA peak allocated memory is printed too. Speed is the median over timed steps after warmup.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.models import create_model, train_flops_per_sample  # noqa: E402


def monai_mae(cfg, device):
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(
        in_channels=cfg.in_chans,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.embed_dim,
        mlp_dim=int(cfg.embed_dim * cfg.mlp_ratio),
        num_layers=cfg.depth,
        num_heads=cfg.num_heads,
        masking_ratio=cfg.mask_ratio,
        decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_mlp_dim=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        decoder_num_layers=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        qkv_bias=cfg.qkv_bias,
        spatial_dims=len(cfg.img_size),
    ).to(device)


def monai_loss(model, x, ours):
    pred, mask = model(x)
    target = ours.patchify(x)  # same voxel count per patch; the order only matters for meaning, not for cost
    return (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()


class SavedBytes(contextlib.AbstractContextManager):
    """Bytes of distinct storages autograd keeps for backward while active."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def step_fn(model, loss_fn, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step(x):
        with autocast:
            loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(name, model, loss_fn, x, device, dtype, steps, warmup):
    step = step_fn(model, loss_fn, device, dtype)
    try:
        for _ in range(warmup):
            step(x)
    except Exception as e:  # report, don't hide: MONAI's MAE fails under CPU bf16 autocast
        print(f"  {name:<34s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return None
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with SavedBytes() as saved, autocast:
        loss = loss_fn(x)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    loss.backward()
    model.zero_grad(set_to_none=True)
    t = statistics.median(times)
    extra = f", peak {peak:.2f} GiB" if peak is not None else ""
    print(f"  {name:<34s} {t:8.3f} s/step   activations {saved.bytes / 2**30:6.2f} GiB{extra}")
    return t, saved.bytes


def run(device, dtype, args):
    kw = dict(img_size=(args.size,) * 3)
    if args.quick:
        kw.update(embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3)
    torch.manual_seed(0)
    ours = create_model("mae_vit_base_patch16_3d", **kw).to(device)
    cfg = ours.cfg
    x = torch.randn(args.batch, cfg.in_chans, *cfg.img_size, device=device)
    label = f"{device.type} {str(dtype).replace('torch.', '')}"
    print(
        f"\n== {label}: MAE ViT {cfg.embed_dim}d×{cfg.depth}, decoder {cfg.decoder_embed_dim}d×{cfg.decoder_depth}, "
        f"{cfg.img_size}, batch {args.batch}, mask {cfg.mask_ratio}"
    )
    res = {"ours": measure("medmae", ours, lambda v: ours(v)[0], x, device, dtype, args.steps, args.warmup)}
    ours.set_grad_checkpointing(True)
    res["ckpt"] = measure(
        "medmae + grad checkpointing", ours, lambda v: ours(v)[0], x, device, dtype, args.steps, args.warmup
    )
    ours.set_grad_checkpointing(False)
    if dtype == torch.bfloat16:  # DeepSpeed's bf16 mode: bf16 weights, no per-forward autocast casts
        half = create_model("mae_vit_base_patch16_3d", **kw).to(device, dtype)
        res["bf16_weights"] = measure(
            "medmae, bf16 weights (DeepSpeed bf16)",
            half,
            lambda v: half(v)[0],
            x.to(dtype),
            device,
            torch.float32,
            args.steps,
            args.warmup,
        )
        del half
    torch.manual_seed(0)
    ref = monai_mae(cfg, device)
    res["monai"] = measure(
        "MONAI MaskedAutoEncoderViT", ref, lambda v: monai_loss(ref, v, ours), x, device, dtype, args.steps, args.warmup
    )
    if res["ours"] and res["monai"]:
        print(
            f"  speed vs MONAI: {res['monai'][0] / res['ours'][0]:.2f}x  "
            f"(activation memory {res['ours'][1] / res['monai'][1]:.2f}x of MONAI's)"
        )
    if res["ours"] and res["ckpt"]:
        print(
            f"  checkpointing: {res['ckpt'][1] / res['ours'][1]:.2f}x activation memory at "
            f"{res['ckpt'][0] / res['ours'][0]:.2f}x time"
        )
    if device.type == "cuda" and res["ours"]:
        from medmae.training.logs import peak_flops

        flops = train_flops_per_sample("mae_vit_base_patch16_3d", cfg) * args.batch / res["ours"][0]
        peak = peak_flops(device, dtype)
        print(f"  achieved {flops / 1e12:.1f} TFLOP/s" + (f", MFU {flops / peak:.1%}" if peak else ""))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96, help="cubic crop edge (default 96)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model on 32³: a smoke run in seconds")
    args = ap.parse_args()
    if args.quick:
        args.size, args.steps, args.warmup = 32, 2, 1
    cpu = torch.device("cpu")
    fp32 = run(cpu, torch.float32, args)["ours"]
    bf16 = run(cpu, torch.bfloat16, args)
    if fp32 and bf16["ours"]:
        print(f"\nCPU bf16 autocast vs fp32 (ours): {fp32[0] / bf16['ours'][0]:.2f}x faster")
    if fp32 and bf16.get("bf16_weights"):
        print(f"CPU bf16 weights vs fp32 (ours): {fp32[0] / bf16['bf16_weights'][0]:.2f}x faster")
    if torch.cuda.is_available():
        run(torch.device("cuda"), torch.bfloat16, args)


if __name__ == "__main__":
    main()
