"""One-shot GPU check: what a CUDA node gives this code, in one process, written to one JSON and a short table.

    bench/gpu_check.sh                 # on a GPU machine (≤ 8 min on one H100/H200)
    bench/gpu_check.sh --cpu           # smoke run on the CPU: tiny sizes, CUDA-only sections skipped

Sections (each guarded: a failure is recorded and the next section runs):
  env       torch / CUDA / NCCL versions, device, native bf16
  sdpa      which scaled_dot_product_attention kernel runs for the MAE encoder and decoder shapes (profiler)
  model     ViT-B/16 96³ MAE train step, bf16: ours (bf16 weights as DeepSpeed trains, and autocast) vs MONAI's
            MaskedAutoEncoderViT (autocast), at several batch sizes; FLOPs from torch's flop counter; MFU
  engine    the same model in our DeepSpeed engine (ZeRO-2 bf16): step time and host syncs per step, with our
            generated config and with DeepSpeed's throughput timer switched back on (the old config)
  zero      the engine's step at ZeRO stages 0, 1 and 2 (bf16): time, kernels and host syncs per step
  profile   where a step's time goes: GPU-busy time vs wall time, kernels per step, the costliest host operations
            (model alone, and inside the DeepSpeed engine)
  pinned    whether a non_blocking host-to-device copy of a batch overlaps (pinned) or blocks (pageable)
  loader    crops/s of the resident crop path on the device vs the model's own consumption rate
  train     a short pretraining run of the real trainer (DeepSpeed ZeRO-2 bf16, one process) on generated shards
  compile   the model section's largest batch under torch.compile (bf16 weights): compile time and step time
  mfu       issue 17's table (bench/gpu_mfu.py; `bench/gpu_check.sh mfu` runs it alone, <= 5 min on one H200):
            model eager vs compiled, the engine per ZeRO stage, the real trainer at micro-batch 128 and 256 with
            compile off and on; crops/s, MFU, kernels, syncs and GPU-busy fraction per row
  predict   UNETR ViT-B/16 sliding-window prediction of a 256x256x160 volume (96³ windows, overlap 0.5, bf16,
            sw-batch 16): volumes/s, and with test-time mirroring (--tta, 8 passes per window)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import monai_mae  # noqa: E402  (the same reference model in both benches)
from gpu_engine import section_engine, section_profile, section_zero  # noqa: E402
from gpu_mfu import section_mfu  # noqa: E402
from step_timing import model_kwargs, timed, train_flops, train_step, vit_b  # noqa: E402

from medmae.io import write_json_atomic  # noqa: E402
from medmae.models import create_model  # noqa: E402

SECTIONS = (
    "env",
    "sdpa",
    "model",
    "engine",
    "zero",
    "profile",
    "pinned",
    "loader",
    "train",
    "compile",
    "mfu",
    "predict",
)


# ---- sections ------------------------------------------------------------------------------------------------------


def section_env(args, device):
    out = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            device=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
            sdp_enabled={
                k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                for k in ("flash", "mem_efficient", "math", "cudnn")
            },
        )
    for mod in ("deepspeed", "monai", "timm", "webdataset", "zarr"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[mod] = f"missing: {type(e).__name__}"
    from medmae.training.logs import peak_flops

    out["peak_bf16_tflops"] = (peak_flops(device, torch.bfloat16) or 0) / 1e12
    return out


def _sdpa_kernels(shape, dtype, device):
    from torch.profiler import ProfilerActivity, profile

    from medmae.layers import Attention

    b, n, d, heads = shape
    attn = Attention(d, heads).to(device, dtype)
    x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
    attn(x).sum().backward()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        attn(x).sum().backward()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    hits = [
        k
        for k in names
        if any(
            s in k.lower() for s in ("flash", "fmha", "efficient_attention", "cudnn", "sdpa", "attention", "softmax")
        )
    ]
    low = " ".join(hits).lower()
    kind = (
        "flash"
        if "flash" in low
        else "cudnn"
        if "cudnn" in low
        else "mem_efficient"
        if ("fmha" in low or "efficient" in low)
        else "math"
    )
    return {"kernel": kind, "kernels": sorted(set(h[:120] for h in hits))[:6]}


def section_sdpa(args, device):
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    b = args.batch[-1]
    return {
        "encoder (B, 55 tokens, 768, 12 heads) bf16": _sdpa_kernels((b, 55, 768, 12), torch.bfloat16, device),
        "decoder (B, 217 tokens, 384, 12 heads) bf16": _sdpa_kernels((b, 217, 384, 12), torch.bfloat16, device),
    }


def section_model(args, device):
    from medmae.models import train_flops_per_sample
    from medmae.training.logs import peak_flops

    bf16 = torch.bfloat16
    peak = peak_flops(device, bf16) if device.type == "cuda" else None
    out: dict = {"rows": []}
    for b in args.batch:
        torch.manual_seed(0)
        ours = create_model("mae_vit_base_patch16_3d", **model_kwargs(args)).to(device)
        cfg = ours.cfg
        x = torch.randn(b, cfg.in_chans, *cfg.img_size, device=device)
        flops = train_flops(ours, x)
        meta = train_flops_per_sample("mae_vit_base_patch16_3d", cfg) * b  # what the trainer's MFU uses
        row = {"batch": b, "flops_per_sample_G": flops / b / 1e9, "meta_count_over_device_count": meta / flops}
        half = create_model("mae_vit_base_patch16_3d", **model_kwargs(args)).to(device, bf16)
        row["ours_bf16_weights_s"] = timed(train_step(half, x.to(bf16), None), args.steps, args.warmup, device)
        del half
        row["ours_autocast_s"] = timed(train_step(ours, x, bf16), args.steps, args.warmup, device)
        ours.set_grad_checkpointing(True)
        row["ours_autocast_ckpt_s"] = timed(train_step(ours, x, bf16), args.steps, args.warmup, device)
        ours.set_grad_checkpointing(False)
        try:
            ref = monai_mae(cfg, device)

            def ref_loss(v, ref=ref, ours=ours):
                pred, mask = ref(v)
                return (((pred.float() - ours.patchify(v)) ** 2).mean(-1) * mask).sum() / mask.sum()

            try:
                row["monai_autocast_s"] = timed(train_step(ref, x, bf16, ref_loss), args.steps, args.warmup, device)
                row["speed_vs_monai_autocast"] = row["monai_autocast_s"] / row["ours_autocast_s"]
            except Exception as e:  # noqa: BLE001 - MONAI's MAE fails under bf16 autocast (index_put dtypes)
                row["monai_autocast_s"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            ref = ref.to(bf16)  # bf16 weights, no autocast: what DeepSpeed's bf16 mode runs, and MONAI's MAE allows
            row["monai_bf16_weights_s"] = timed(
                train_step(ref, x.to(bf16), None, ref_loss), args.steps, args.warmup, device
            )
            row["speed_vs_monai_bf16_weights"] = row["monai_bf16_weights_s"] / row["ours_bf16_weights_s"]
            del ref
        except Exception as e:  # noqa: BLE001
            row["monai_bf16_weights_s"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        best = min(row["ours_bf16_weights_s"], row["ours_autocast_s"])
        row["crops_per_s"] = b / best
        if peak:
            row["mfu"] = flops / best / peak
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        out["rows"].append(row)
        print(f"  model b={b}: {row}", flush=True)
        del ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def section_pinned(args, device):
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    b = args.batch[-1]
    host = torch.randn(b, 1, args.size, args.size, args.size)
    pinned = host.pin_memory()
    out = {"bytes": host.numel() * host.element_size()}
    for name, src in (("pageable", host), ("pinned", pinned)):
        for _ in range(2):
            src.to(device, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = src.to(device, non_blocking=True)
        t_call = time.perf_counter() - t0
        torch.cuda.synchronize()
        t_total = time.perf_counter() - t0
        del y
        out[name] = {
            "call_ms": t_call * 1e3,
            "copy_ms": t_total * 1e3,
            "gb_per_s": out["bytes"] / t_total / 1e9,
            "overlaps": t_call < 0.25 * t_total,
        }
    return out


def section_loader(args, device):
    try:
        from bench_data import measure_loader  # the resident crop path vs the model (issue 12)
    except ImportError as e:
        return {"skipped": f"no loader bench in this checkout ({e})"}
    return measure_loader(device, tiny=args.tiny)


def section_train(args, device):
    """The real trainer in one process (DeepSpeed ZeRO-2 bf16; Ray's wheel is too large to carry to a lent GPU)
    on generated CT-like volumes converted by the real converter: steps/s, volumes/s and MFU from its metrics."""
    from medmae.config import load_config
    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import write_phantom_dataset
    from medmae.training.config import JobConfig
    from medmae.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shape = (48, 48, 48) if args.tiny else (160, 160, 128)
        datalist = write_phantom_dataset(root / "raw", n=4 if args.tiny else 12, shape=shape, seed=0)
        t0 = time.perf_counter()
        convert(
            datalist,
            root / "wds",
            ConvertOptions(format="wds", preset="ct", workers=min(8, os.cpu_count() or 1), shard_size_mb=64),
            progress=False,
        )
        convert_s = time.perf_counter() - t0
        micro = 2 if args.tiny else args.batch[-1] // 2
        overrides = [
            f"data.path={root / 'wds'}",
            f"run.output_dir={root / 'runs'}",
            "run.name=gpu_check",
            f"train.max_steps={args.train_steps}",
            f"train.micro_batch={micro}",
            "run.log_every=10",
            "run.image_every=0",
            "run.checkpoint_every=100000",
            "dist.num_workers=1",
            "dist.zero_stage=0",
            f"data.num_workers={2 if args.tiny else 8}",
        ]
        if not args.tiny:
            overrides += ["model.name=mae_vit_base_patch16_3d", "data.roi_size=[96,96,96]", "dist.precision=bf16"]
        cfg = load_config(JobConfig, Path(__file__).resolve().parents[1] / "configs/pretrain_debug.yaml", overrides)
        t0 = time.perf_counter()
        Trainer(cfg).train()
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (root / "runs/gpu_check/metrics.jsonl").read_text().splitlines()]
        lines = [x for x in lines if "train/loss" in x]
        data = lines[-1:]
        steady = [x for x in lines if x["step"] > 10 and "train/volumes_per_s" in x] or lines[-1:]
        out = {
            "model": cfg.model["name"],
            "micro_batch": micro,
            "steps": args.train_steps,
            "wall_s": wall,
            "convert_s": convert_s,
            "loss_first": lines[0]["train/loss"],
            "loss_last": lines[-1]["train/loss"],
        }
        if data:
            out["data"] = {k: v for k, v in data[-1].items() if k.startswith("data/")}
        for key in ("volumes_per_s", "step_time_s", "mfu", "memory_gib"):
            vals = [x[f"train/{key}"] for x in steady if x.get(f"train/{key}") is not None]
            if vals:
                out[key] = statistics.median(vals)
        return out


def section_compile(args, device):
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    b, model, x = vit_b(args, device)
    eager = timed(train_step(model, x, None), args.steps, args.warmup, device)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    step = train_step(compiled, x, None)
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    t = timed(step, args.steps, args.warmup, device)
    return {"batch": b, "eager_s": eager, "compiled_s": t, "speedup": eager / t, "compile_s": compile_s}


def section_predict(args, device):
    """What tools/predict.py does per volume once it is read and preprocessed (random weights and intensities)."""
    import numpy as np

    from medmae.data.convert import ConvertOptions
    from medmae.inference import Predictor

    name = "unetr_vit_3d_debug" if args.tiny else "unetr_vit_base_patch16_3d"
    shape = (args.size + 8, args.size, args.size) if args.tiny else (256, 256, 160)  # tiny: 2 windows
    model = create_model(name, num_classes=14, img_size=(args.size,) * 3)
    meta = {
        "task": "segment",
        "preprocessing": {**ConvertOptions(preset="ct").preprocessing(), "spatial_dims": 3, "channels": 1},
        "model_config": {"in_chans": 1},
        "roi_size": [args.size] * 3,
    }
    predictor = Predictor(model, meta, sw_batch=2 if args.tiny else 16, device=str(device))
    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    out: dict = {"model": name, "shape": list(shape), "roi": args.size}
    for key, fn in (("one_pass", predictor.logits), ("tta", lambda x: predictor.probabilities(x, tta=True))):
        if device.type == "cuda":
            fn(image)  # warm-up: kernels, autotuning
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[key] = {"s_per_volume": seconds, "volumes_per_s": 1 / seconds}
    out["tta_cost"] = out["tta"]["s_per_volume"] / out["one_pass"]["s_per_volume"]
    return out


SECTION_FUNCS = {
    "env": section_env,
    "sdpa": section_sdpa,
    "model": section_model,
    "engine": section_engine,
    "zero": section_zero,
    "profile": section_profile,
    "pinned": section_pinned,
    "loader": section_loader,
    "train": section_train,
    "compile": section_compile,
    "mfu": section_mfu,
    "predict": section_predict,
}
assert tuple(SECTION_FUNCS) == SECTIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="?", choices=SECTIONS, help="run this one section (e.g. mfu)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="folder for gpu_check.json")
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU with tiny sizes")
    ap.add_argument(
        "--sections",
        default=",".join(s for s in SECTIONS if s not in ("compile", "mfu")),
        help=f"comma list of {', '.join(SECTIONS)} (default: all but compile and mfu, which run alone)",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 32, 128], help="per-GPU batch sizes to time")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=100)
    args = ap.parse_args()
    args.tiny = args.cpu
    if args.only:
        args.sections = args.only
    if args.cpu:
        args.batch, args.size, args.steps, args.warmup, args.train_steps = [2], 32, 2, 1, 6
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device), "args": vars(args)}
    out = Path(args.out)
    name = "gpu_check.json" if device.type == "cuda" else "gpu_check_cpu.json"
    if args.only:
        name = name.replace("gpu_check", f"gpu_check_{args.only}")
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"== {section}", flush=True)
        try:
            results[section] = SECTION_FUNCS[section](args, device)
        except Exception as e:  # noqa: BLE001 - one broken section must not cost the others
            results[section] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        results[section + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(results[section], indent=1, default=str)[:3000], flush=True)
        write_json_atomic(out / name, json.loads(json.dumps(results, default=str)))
    failed = [s for s in args.sections.split(",") if isinstance(results.get(s), dict) and "error" in results[s]]
    print(f"\nwrote {out / name}; sections failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
