"""Masked-stage (SimMIM) training-step throughput and peak memory.

    python benchmarks/masked_step.py                 # tiny CPU config, Swin-v2-L at 192 px
    python benchmarks/masked_step.py --only tiny     # one row
    python benchmarks/masked_step.py --steps 20 --precision bf16

Prints one row per configuration: images/s of a full training step (forward, L1 loss on masked
pixels, backward, gradient clipping, AdamW), peak memory (GPU: allocator peak; CPU: growth of
the process's maximum resident set), and on a GPU the model FLOPs per step and the MFU against
the card's dense bf16 peak (H100 SXM 989 TFLOP/s, H200 the same).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import maxrss_mb, print_table

from mesadepth.models.backbone import build_encoder
from mesadepth.models.simmim import MaskGenerator, SimMIM
from mesadepth.optim import param_groups_no_decay

CONFIGS = {
    "tiny": {"preset": "tiny-cpu", "img": 64, "mask_patch": 16, "batch": {"cpu": 32, "cuda": 256}},
    "swinv2-L": {
        "preset": "swinv2_large_window12_192",
        "img": 192,
        "mask_patch": 32,
        "batch": {"cpu": 2, "cuda": 128},
    },
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def bench(name: str, steps: int, device: str, precision: str) -> dict:
    c = CONFIGS[name]
    batch = c["batch"]["cuda" if device == "cuda" else "cpu"]
    torch.manual_seed(0)
    encoder = build_encoder(c["preset"], img_size=c["img"], drop_path_rate=0.1, layer_norm_eps=1e-5)
    model = SimMIM(
        encoder, norm_target=True, norm_target_patch_size=47 if c["img"] >= 192 else 15
    ).to(device)
    opt = torch.optim.AdamW(param_groups_no_decay(model, 0.05), lr=1e-4)
    masks = MaskGenerator(c["img"], c["mask_patch"], 4, 0.6)
    rng = np.random.default_rng(0)
    x = torch.randn(batch, 3, c["img"], c["img"], device=device)
    m = torch.from_numpy(np.stack([masks(rng) for _ in range(batch)])).to(device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss, _ = model(x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    rss0 = maxrss_mb()
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
        "precision": precision,
        "batch": batch,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_s": round(dt, 4),
        "images_per_s": round(batch / dt, 1),
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
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one configuration")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="default: bf16 on GPU, fp32 on CPU",
    )
    args = ap.parse_args()
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    rows = [
        bench(n, args.steps, args.device, precision)
        for n in ([args.only] if args.only else CONFIGS)
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
