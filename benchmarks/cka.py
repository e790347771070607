"""CKA analysis cost: time and peak memory of the within-model 9 x 9 matrix over N images.

    python benchmarks/cka.py                     # tiny encoder at N = 64 and 256, + Swin-v2-L projection
    python benchmarks/cka.py --sizes 64 256 1024 --no-large
    python benchmarks/cka.py --estimators minibatch debiased

Each (estimator, N) row runs in a fresh process so that the peak resident set (``ru_maxrss``,
which only ever grows) belongs to that row alone: the row reports its growth over the process's
state after building the encoder and running one warm-up batch. Times are the best of three
runs of the whole analysis. tracemalloc cannot see torch's
allocations; on a GPU, torch's own peak counter is reported instead. The "state" column is the
estimator's own storage (the float64 HSIC sums for minibatch; every image's features for the
full-Gram estimators).

Tiny configuration: Swin-v2 with depths (2, 2, 18, 2), embed 8, one head per stage, window 4,
64 px input: the nine paper layers with the spec's layer map, random weights with non-zero
res-post-norms, random smooth uint8 images, batch 32.

Swin-v2-L projection (654 NYUv2 test images at 480 x 480, one encoder's 9 x 9 matrix): the
measured per-image forward time of the real Swin-v2-L 480 encoder (batch 1, after one warm-up
pass) plus the measured per-image cost of the minibatch CKA update at the true tap shapes of
spec B5.2 (synthetic features, batch 8), times 654. The CKA term scales with the batch size
(each image meets b - 1 others in its batch's Gram matrix), so it is also given for batch 32 as
the batch-8 value x 4. Two encoders (pre vs fine-tuned) double the forward term.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from _common import maxrss_mb

from mesadepth.analysis.cka import (
    CKAAccumulator,
    ImagePreprocess,
    analyse,
    encoder_features,
    u_centred_stack,
)
from mesadepth.models.backbone import build_encoder

NYU_TEST = 654
TINY = {"img_size": 64, "embed_dim": 8, "depths": (2, 2, 18, 2), "num_heads": (1, 1, 1, 1)}
# Spec B5.2: the nine taps of Swin-v2-L at 480 x 480 (timm NHWC without the batch axis).
LARGE_TAPS = [(60, 60, 384)] + [(30, 30, 768)] * 6 + [(15, 15, 1536)] * 2


def _tiny_encoder(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = build_encoder(TINY, window_size=4)
    with torch.no_grad():
        # timm zero-initialises the res-post-norm weights, which makes the norm1 taps constant.
        for name, p in enc.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.normal_(1.0, 0.3)
    return enc.to(device).eval()


def _batches(n: int, batch: int, size: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    pattern = 60 * np.sin(6 * xx + 3 * yy)[None, ..., None]
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        imgs = np.clip(0.5 * rng.integers(0, 256, (b, size, size, 3)) + pattern, 0, 255)
        out.append({"image": list(imgs.astype(np.uint8)), "id": [str(i + k) for k in range(b)]})
    return out


def worker(estimator: str, n: int, batch: int, device: str, repeats: int = 3) -> dict:
    """One row, measured in this (fresh) process."""
    enc = _tiny_encoder(device)
    data = _batches(n, batch)
    analyse({"tiny": enc}, data[:1], estimator=estimator, device=device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = maxrss_mb()
    times = []
    for _ in range(repeats):  # best of a few: a shared CPU stalls now and then
        t0 = time.perf_counter()
        res = analyse({"tiny": enc}, data, estimator=estimator, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = min(times)
    row = {
        "estimator": estimator,
        "N": n,
        "batch": batch,
        "best_of_3_s": round(dt, 3),
        "images_per_s": round(n / dt, 1),
        "state_KiB": round(res.state_bytes / 1024, 1),
        "rss_growth_MiB": round(maxrss_mb() - rss0, 1),
        "cka_0_8": round(float(res.within["tiny"][0, 8]), 4),
    }
    if device == "cuda":
        row["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def large_projection(device: str, batch: int = 8) -> dict:
    """Measured Swin-v2-L 480 forward + minibatch update at the true tap shapes, per image."""
    enc = build_encoder("swinv2_large_window30_480", drop_path_rate=0.0).to(device).eval()
    x = ImagePreprocess(480)([np.zeros((480, 640, 3), np.uint8)]).to(device)
    encoder_features(enc, x)  # warm-up
    t0 = time.perf_counter()
    feats = encoder_features(enc, x)
    if device == "cuda":
        torch.cuda.synchronize()
    fwd = time.perf_counter() - t0
    assert [tuple(f.shape[1:]) for f in feats] == LARGE_TAPS
    del enc, feats

    g = torch.Generator(device=device).manual_seed(0)
    taps = [torch.randn((batch, *s), generator=g, device=device) for s in LARGE_TAPS]
    acc = CKAAccumulator(9, 9)
    stack = u_centred_stack(taps)  # warm-up
    t0 = time.perf_counter()
    stack = u_centred_stack(taps)
    acc.update_u(stack, stack)
    if device == "cuda":
        torch.cuda.synchronize()
    cka_per_image = (time.perf_counter() - t0) / batch
    per_image_32 = cka_per_image * 32 / batch
    return {
        "forward_s_per_image": round(fwd, 3),
        f"cka_s_per_image_batch{batch}": round(cka_per_image, 4),
        "cka_s_per_image_batch32": round(per_image_32, 4),
        "projected_654_minutes_batch32": round(NYU_TEST * (fwd + per_image_32) / 60, 1),
        "projected_654_minutes_pair_batch32": round(NYU_TEST * (2 * fwd + per_image_32) / 60, 1),
        "features_MiB_per_image": round(sum(np.prod(s) for s in LARGE_TAPS) * 4 / 2**20, 1),
    }


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(width[k]) for k in keys)]
    lines += ["  ".join(str(r.get(k, "")).ljust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image counts N")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--estimators", nargs="+", default=["minibatch", "debiased"], help="estimators to time"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-large", action="store_true", help="skip the Swin-v2-L projection")
    ap.add_argument("--worker", nargs=2, metavar=("ESTIMATOR", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.batch, args.device)))
        return
    rows = []
    for est in args.estimators:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--worker", est, str(n)]
            cmd += ["--batch", str(args.batch), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"within-model 9x9 CKA, tiny Swin-v2 (depths 2-2-18-2, embed 8, 64 px), {args.device}")
    print(_table(rows))
    if not args.no_large:
        print()
        print(f"Swin-v2-L 480 x 480, 654 NYUv2 test images, {args.device} (projection, see --help)")
        print(_table([large_projection(args.device)]))


if __name__ == "__main__":
    main()
