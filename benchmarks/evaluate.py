"""Cost of `mesadepth evaluate --checkpoint` under the NYUv2 protocol (flip + two windows).

    python benchmarks/evaluate.py                   # tiny rows + Swin-v2-L 480 projection
    python benchmarks/evaluate.py --no-large        # tiny rows only (seconds)
    python benchmarks/evaluate.py --large-protocol  # also time one real 4-crop protocol call of L

The protocol (spec masked-pretraining-and-finetuning.md 2.8) predicts each 480 x 640 test image
as two 480 x 480 windows (columns 0 and 160) and their mirrors: 4 crops, which
``model_batch_predictor`` sends through the model as one batch (``--batch N`` images -> 4N crops).

Rows:

- ``tiny-cpu`` (the demo / test encoder, 64 px input, head filters 32): seconds per test image of
  the whole protocol (crop, resize each window to 64 px, forward, resize back, flip and window
  averaging), on random 480 x 640 images and on 48 x 64 images (the tiny synthetic world), at
  batch 1 and 4. Best of three passes over 8 images, after a warm-up pass.
- ``swinv2_large_window30_480`` (the paper's encoder + the spec 2.2 head, random weights): one
  forward pass at batch 1 (best of two after a warm-up), times 4 crops per image and 654 test
  images = the projected single-process CPU time of the NYUv2 evaluation. ``--large-protocol``
  also times the real call (4 crops in one batch) for one image.

CPU threads are torch's default unless ``--threads`` (printed). Timings on a shared machine vary; the table prints the
measured numbers only.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from mesadepth.evaluation.evaluate import model_batch_predictor
from mesadepth.models.backbone import build_encoder
from mesadepth.models.depth_head import DepthModel

NYU_TEST = 654
CROPS_PER_IMAGE = 4  # two windows x (image, mirror)


def _images(n: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 80 * np.sin(xx / 23.0)[..., None] * np.cos(yy / 17.0)[..., None]
    return [
        np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8) for _ in range(n)
    ]


def _model(preset: str) -> DepthModel:
    torch.manual_seed(0)
    return DepthModel.from_encoder(build_encoder(preset, drop_path_rate=0.0)).eval()


def tiny_rows(n_images: int = 8) -> list[dict]:
    model = _model("tiny-cpu")
    rows = []
    for h, w in ((480, 640), (48, 64)):
        images = _images(n_images, h, w)
        for batch in (1, 4):
            predict = model_batch_predictor(model, "cpu", flip=True, shift_window=True)
            predict(images[:batch])  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(0, n_images, batch):
                    predict(images[i : i + batch])
                times.append(time.perf_counter() - t0)
            per_image = min(times) / n_images
            rows.append(
                {
                    "model": "tiny-cpu (64 px)",
                    "image": f"{w}x{h}",
                    "batch": batch,
                    "crops_per_forward": CROPS_PER_IMAGE * batch,
                    "s_per_image": round(per_image, 4),
                    "nyu_654_minutes": round(per_image * NYU_TEST / 60, 2),
                }
            )
    return rows


def large_row(protocol: bool) -> dict:
    t0 = time.perf_counter()
    model = _model("swinv2_large_window30_480")
    build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 3, 480, 480, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(2):
            t0 = time.perf_counter()
            y = model(x)
            times.append(time.perf_counter() - t0)
    assert tuple(y.shape) == (1, 1, 480, 480)
    fwd = min(times)
    row = {
        "model": "swinv2_large_window30_480 + head",
        "image": "640x480",
        "params_M": round(n_params / 1e6, 1),
        "build_s": round(build, 1),
        "forward_s_batch1": round(fwd, 2),
        "s_per_image": round(CROPS_PER_IMAGE * fwd, 2),
        "nyu_654_hours": round(CROPS_PER_IMAGE * fwd * NYU_TEST / 3600, 2),
    }
    if protocol:
        predict = model_batch_predictor(model, "cpu", flip=True, shift_window=True)
        image = _images(1, 480, 640)
        t0 = time.perf_counter()
        predict(image)
        call = time.perf_counter() - t0
        row["protocol_call_s (4 crops, 1 forward)"] = round(call, 2)
        row["nyu_654_hours_measured_call"] = round(call * NYU_TEST / 3600, 2)
    row["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def dataset_row(nyu_root: str) -> dict:
    """The whole ``evaluate`` loop on a real-format NYUv2 folder (the synthetic world's by
    default): images/s end to end, and the share of wall time spent outside the model's forward
    passes (reading the .mat, cropping/resizing, flip/window averaging, metrics)."""
    from pathlib import Path

    from mesadepth.evaluation.evaluate import evaluate, model_predictor, nyu_samples

    root = Path(nyu_root)
    model = _model("tiny-cpu")
    spent = [0.0]
    starts: list[float] = []
    model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    model.register_forward_hook(
        lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - starts.pop())
    )
    predict = model_predictor(model)
    # One untimed pass warms the file cache, as a second evaluation of the same set would be.
    list(nyu_samples(root / "nyu_depth_v2_labeled.mat", root / "splits.mat"))
    t0 = time.perf_counter()
    samples = nyu_samples(root / "nyu_depth_v2_labeled.mat", root / "splits.mat")
    res = evaluate("nyu", samples, lambda s, i: predict(s.image), progress=False)
    wall = time.perf_counter() - t0
    n = int(res.get("count") or len(res.get("per_image", [])) or 0)
    return {
        "config": f"tiny-cpu on {root}",
        "images": n,
        "images_per_s": round(n / wall, 2) if wall > 0 else None,
        "wall_s": round(wall, 3),
        "share_outside_model": round(1.0 - spent[0] / wall, 3) if wall > 0 else None,
    }


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(width[k]) for k in keys)]
    lines += ["  ".join(str(r.get(k, "")).ljust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-large", action="store_true", help="skip the Swin-v2-L projection")
    ap.add_argument(
        "--large-protocol", action="store_true", help="also time one real 4-crop call of L"
    )
    ap.add_argument("--images", type=int, default=8, help="tiny rows: images per pass")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument(
        "--nyu",
        default="runs/world/nyu",
        help="NYUv2-format folder for the end-to-end row (skipped if absent)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 is steadier on a busy box)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    rows = tiny_rows(args.images)
    print(_table(rows))
    from pathlib import Path

    if (Path(args.nyu) / "nyu_depth_v2_labeled.mat").is_file():
        full = dataset_row(args.nyu)
        print()
        print(_table([full]))
        rows.append(full)
    if not args.no_large:
        large = large_row(args.large_protocol)
        print()
        print(_table([large]))
        rows.append(large)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
