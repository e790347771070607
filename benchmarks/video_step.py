"""Geometric (SC-DepthV2, GP) and supervised (SC-DepthV3, SP) training-step cost and peak memory.

    python benchmarks/video_step.py                      # every row, each in its own process
    python benchmarks/video_step.py --only tiny-gp       # one row
    python benchmarks/video_step.py --steps 10 --threads 2

One full training step of :class:`mesadepth.stages.video.VideoPretraining`: GP = DepthNet on
the target and the two ARN-rectified references, six ARN and four PoseNet passes, photometric +
geometry + smoothness + ARN losses; SP = three DepthNet and four PoseNet passes, the v3 losses
with pseudo-depth (spec section 6); then backward and Adam. Inputs are smooth synthetic frames
(the cost does not depend on their content, except the number of edge pixels of the v3
relative-normal loss). Rows:

- ``tiny-gp`` / ``tiny-sp``: the demo's networks (tiny-cpu Swin-v2, PoseNet width 16) at
  96x128, batch 4;
- ``large-gp`` / ``large-sp``: Swin-v2-L at 480x480 (windows 30/30/30/15), reference
  ResNet-18 PoseNet / ARN, batch 1 (one GPU's share of the paper recipe).

Columns: wall seconds per step, CPU seconds per step (process time: on a shared machine it
tracks the work better than the wall clock), images per second (target frames), and peak
memory (GPU: allocator peak; CPU: growth of the process's maximum resident set, each row in a
fresh process).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from _common import maxrss_mb, print_table, row_in_subprocess

from mesadepth.config import load_config
from mesadepth.stages.video import VideoPretraining, VideoRecipe

CONFIGS: dict[str, dict] = {
    "tiny-gp": {
        "version": "v2",
        "size": (96, 128),
        "batch": 4,
        "overrides": ["encoder.preset=tiny-cpu", "pose.width=16"],
    },
    "tiny-sp": {
        "version": "v3",
        "size": (96, 128),
        "batch": 4,
        "overrides": ["encoder.preset=tiny-cpu", "pose.width=16"],
    },
    "large-gp": {
        "version": "v2",
        "size": (480, 480),
        "batch": 1,
        "overrides": [
            "encoder.preset=swinv2_large_window12_192",
            "encoder.window_size=[30,30,30,15]",
            "encoder.pretrained_window_sizes=[12,12,12,6]",
            "encoder.drop_path_rate=0.1",
        ],
    },
    "large-sp": {
        "version": "v3",
        "size": (480, 480),
        "batch": 1,
        "overrides": [
            "encoder.preset=swinv2_large_window12_192",
            "encoder.window_size=[30,30,30,15]",
            "encoder.pretrained_window_sizes=[12,12,12,6]",
            "encoder.drop_path_rate=0.1",
        ],
    },
}


def _smooth(b: int, c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random maps: 8x8 noise upsampled bilinearly."""
    return F.interpolate(torch.rand(b, c, 8, 8, generator=g), size=(h, w), mode="bilinear")


def make_batch(cfg: dict, device: str) -> dict:
    """A synthetic batch shaped like the training loader's (normalised frames, K, pseudo-depth)."""
    g = torch.Generator().manual_seed(0)
    b, (h, w) = cfg["batch"], cfg["size"]
    norm = lambda x: (x - 0.45) / 0.225  # noqa: E731
    image = norm(_smooth(b, 3, h, w, g))
    # References: the target shifted by one pixel each way, like a small camera motion.
    refs = [torch.roll(image, s, dims=-1) for s in (-1, 1)]
    K = torch.tensor([[0.8 * w, 0, w / 2], [0, 0.8 * w, h / 2], [0, 0, 1]]).expand(b, 3, 3)
    batch = {"image": image, "refs": refs, "K": K.contiguous()}
    if cfg["version"] == "v3":
        batch["pseudo_depth"] = 1000 + 59000 * _smooth(b, 1, h, w, g)
    return {
        k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device))
        for k, v in batch.items()
    }


def bench(name: str, steps: int, device: str) -> dict:
    cfg = CONFIGS[name]
    h, w = cfg["size"]
    recipe = load_config(
        VideoRecipe,
        None,
        [f"version={cfg['version']}", f"data.size=[{h},{w}]", *cfg["overrides"]],
    )
    torch.manual_seed(0)
    module = VideoPretraining(recipe).to(device)
    opt = module.configure_optimizers()
    batch = make_batch(cfg, device)

    def step() -> None:
        terms = module.step_terms(batch)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()

    rss0 = maxrss_mb()
    step()  # warm-up: allocator, kernels, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    cpu = (time.process_time() - c0) / steps
    params = sum(p.numel() for p in module.parameters())
    row = {
        "config": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "size": f"{h}x{w}",
        "batch": cfg["batch"],
        "params_M": round(params / 1e6, 2),
        "step_s": round(dt, 3),
        "cpu_s_per_step": round(cpu, 3),
        "images_per_s": round(cfg["batch"] / dt, 2),
    }
    if device == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        row["peak_rss_growth_MiB"] = round(maxrss_mb() - rss0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; large 1)")
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one configuration")
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(CONFIGS), help="rows to skip")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print the row as JSON (internal)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        steps = args.steps or (1 if args.only.startswith("large") else 5)
        row = bench(args.only, steps, args.device)
        print(json.dumps(row) if args.json else row)
        return
    rows = []
    for name in CONFIGS:
        if name in args.skip:
            continue
        extra = ["--device", args.device]
        if args.steps:
            extra += ["--steps", str(args.steps)]
        if args.threads:
            extra += ["--threads", str(args.threads)]
        rows.append(row_in_subprocess(__file__, name, extra))
    print_table(rows)


if __name__ == "__main__":
    main()
