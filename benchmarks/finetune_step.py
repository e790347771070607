"""Depth fine-tuning training-step throughput and peak memory (spec 2.1-2.6).

    python benchmarks/finetune_step.py                  # tiny (demo geometry) and Swin-v2-L at 480 px
    python benchmarks/finetune_step.py --only tiny      # one row
    python benchmarks/finetune_step.py --steps 20 --precision bf16 --batch 3

One row per configuration: seconds and images/s of a full training step (encoder + Xie head
forward, SILog, backward, AdamW over the layer-decay groups, triangle lr step), peak memory
(GPU: allocator peak; CPU: growth of the process's maximum resident set; the first row of a
process also counts the libraries' warm-up), and on a GPU the model FLOPs per step and the MFU
against the card's dense bf16 peak (H100 SXM / H200 989 TFLOP/s). Swin-v2-L is built exactly as
configs/paper/finetune.yaml builds it (480 px, windows 30, 30, 30, 15, pretrained 12, 12, 12, 6,
drop path 0.5); on CPU it runs at batch 1 (the reference's per-GPU batch is 3).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import maxrss_mb, print_table

from mesadepth.losses.silog import silog_loss
from mesadepth.models.backbone import build_encoder
from mesadepth.models.depth_head import DepthModel
from mesadepth.optim import TriangleLR, TriangleSchedule, param_groups_layer_decay

CONFIGS = {
    # configs/demo/finetune.yaml: 96 px crops of the 128x96 demo world.
    "tiny": {
        "preset": "tiny-cpu",
        "overrides": {
            "img_size": 96,
            "window_size": 6,
            "pretrained_window_sizes": (4, 4, 4, 2),
            "drop_path_rate": 0.1,
        },
        "layer_decay": 0.9,
        "batch": {"cpu": 8, "cuda": 64},
    },
    # configs/paper/finetune.yaml.
    "swinv2-L": {
        "preset": "swinv2_large_window30_480",
        "overrides": {"drop_path_rate": 0.5},
        "layer_decay": 0.85,
        "batch": {"cpu": 1, "cuda": 3},
    },
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def bench(name: str, steps: int, device: str, precision: str, batch: int | None) -> dict:
    c = CONFIGS[name]
    batch = batch or c["batch"]["cuda" if device == "cuda" else "cpu"]
    torch.manual_seed(0)
    rss0 = maxrss_mb()
    encoder = build_encoder(c["preset"], layer_norm_eps=1e-6, **c["overrides"])
    encoder.mask_token.requires_grad_(False)
    model = DepthModel.from_encoder(encoder).to(device).train()
    side = int(encoder.patch_embed.img_size[0])
    groups = param_groups_layer_decay(model, 0.05, c["layer_decay"], encoder.config["depths"])
    opt = torch.optim.AdamW(groups, lr=5e-4)
    sched = TriangleLR(opt, TriangleSchedule(5e-4, 3e-5, 1009, 75))
    x = torch.rand(batch, 3, side, side, device=device)
    y = 0.5 + 9 * torch.rand(batch, 1, side, side, device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            pred = model(x)
        loss = silog_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    step()  # warm-up: allocator, kernels, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    flops = None
    if device == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    row = {
        "config": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "input": f"{batch}x3x{side}x{side}",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_s": round(dt, 4),
        "images_per_s": round(batch / dt, 2),
    }
    if device == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["TFLOP_per_step"] = round(flops / 1e12, 2)
        peak = next((v for k, v in PEAK_BF16.items() if k in row["device"]), None)
        if peak and precision == "bf16":
            row["MFU"] = f"{flops / dt / peak:.1%}"
    else:
        row["peak_rss_growth_MiB"] = round(maxrss_mb() - rss0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one configuration")
    ap.add_argument("--batch", type=int, help="images per step (default: per configuration)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="default: fp32 (the reference trains without AMP)",
    )
    args = ap.parse_args()
    precision = args.precision or "fp32"
    rows = [
        bench(n, args.steps, args.device, precision, args.batch)
        for n in ([args.only] if args.only else CONFIGS)
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
