"""Pseudo-depth throughput (frames/s) and peak memory of the teachers behind `mesadepth pseudo-depth`.

    python benchmarks/pseudo_depth.py                          # every row, each in its own process
    python benchmarks/pseudo_depth.py --only leres-r50-448-b4  # one row
    python benchmarks/pseudo_depth.py --threads 1 --frames 4
    python benchmarks/pseudo_depth.py --size 48x64             # the tiny world's frame size
    python benchmarks/pseudo_depth.py --video runs/world/video # frames of an existing world

Teachers are built from spec strings with :func:`mesadepth.teachers.build_teacher`, exactly as
the command builds them (teacher-and-cka.md part A). Two numbers per row:

- model-only: ``teacher.predict`` on in-memory RGB uint8 frames, batch by batch, after one
  warm-up batch; pre-processing (LeReS: resize to 448x448 with the default OpenCV backend,
  the ``resize`` column; ImageNet mean/std) and post-processing (shift, resize back to the
  frame size) included, file I/O excluded;
- end-to-end: :func:`mesadepth.teachers.write_pseudo_depth_tree` (what ``mesadepth
  pseudo-depth`` runs) over an SC-Depth video tree, ``overwrite=True``: JPEG decoding, the
  teacher, uint16 encoding and atomic PNG writes of ``<scene>/leres_depth/``.

Rows:

- ``leres-r50-448-b1`` / ``-b4``: LeReS ResNet-50 at the reference 448x448 input, batch 1 / 4;
- ``leres-x101-448-b1``: LeReS ResNeXt-101 32x8d (the project's default teacher), model-only
  (on CPU two frames by default: it is slow);
- ``mesadepth-tiny-b1`` / ``-b16``: the demo's teacher, a ``mesadepth:`` depth model with the
  geometry of configs/demo/teacher.yaml (tiny-cpu Swin-v2 at 96 px, window 6, head filters 32),
  default options (flip and shifted windows: four passes per frame); batch 16 as the demo
  pipeline uses.

LeReS runs with random weights (the checkpoints are not downloadable offline): its cost does
not depend on the weights. No autocast (bf16/fp16) rows: the teachers have no precision option
(the command always predicts in float32), so there is nothing of the command's to measure.

Frames: synthetic indoor video rendered with the world generator API
(:func:`mesadepth.data.world.render_sequence`, two scenes, supersample 1 because anti-aliasing
does not change the teacher's cost) at ``--size`` (default 480x640, the NYUv2 frame size;
``--size 48x64`` is ``mesadepth synth --preset tiny``). LeReS resizes every frame to 448x448
whatever its size, so the frame size only moves the JPEG decoding, the resize back and the PNG
writing; the mesadepth teacher resizes square windows of the shorter side to 96x96.

Columns: frames/s and CPU seconds per frame (process time: on a shared machine it tracks the
work better than the wall clock) for both measurements; peak memory over the row's timed work
(GPU: allocator peak, weights included; CPU: growth of the process's maximum resident set over
the resident set after the teacher was built, each row in a fresh process; the high-water mark
is reset through /proc/self/clear_refs where Linux allows it, so that loading the checkpoint,
which holds the weights twice for a moment, does not hide the inference peak).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import maxrss_mb, print_table, row_in_subprocess

from mesadepth.teachers import Teacher, build_teacher, write_pseudo_depth_tree

CONFIGS: dict[str, dict] = {
    "leres-r50-448-b1": {"kind": "leres", "backbone": "resnet50", "batch": 1, "e2e": True},
    "leres-r50-448-b4": {"kind": "leres", "backbone": "resnet50", "batch": 4, "e2e": True},
    "leres-x101-448-b1": {"kind": "leres", "backbone": "resnext101", "batch": 1, "e2e": False},
    "mesadepth-tiny-b1": {"kind": "mesadepth", "batch": 1, "e2e": True},
    "mesadepth-tiny-b16": {"kind": "mesadepth", "batch": 16, "e2e": True},
}
# Default frames per measurement, per device: enough for a stable rate, little enough that the
# slow CPU rows finish in minutes.
FRAMES: dict[str, dict[str, int]] = {
    "cpu": {"leres-r50": 8, "leres-x101": 2, "mesadepth-tiny": 32},
    "cuda": {"leres-r50": 64, "leres-x101": 32, "mesadepth-tiny": 128},
}
SCENES = 2


def default_frames(name: str, device: str) -> int:
    table = FRAMES["cuda" if device.startswith("cuda") else "cpu"]
    return next(v for k, v in table.items() if name.startswith(k))


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> (480, 640) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 480x640, got {text!r}") from err
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is too small")
    return h, w


# ----------------------------------------------------------------------------- frames


def render_video(root: Path, n_frames: int, size: tuple[int, int]) -> Path:
    """Write ``root/training/<scene>/*.jpg`` (+ cam.txt): ``n_frames`` over two rendered scenes."""
    from mesadepth.data.video import write_video_scene
    from mesadepth.data.world import SynthConfig, render_sequence

    cfg = SynthConfig()
    cfg.image.height, cfg.image.width = size
    cfg.image.supersample = 1
    per_scene = math.ceil(n_frames / SCENES)
    for s in range(SCENES):
        scene_type, frames = render_sequence(cfg, "nyu", "video", s, per_scene)
        write_video_scene(
            root / "training" / f"{scene_type}_{s:04d}",
            np.stack([f["rgb"] for f in frames]),
            frames[0]["K"],
            jpeg_quality=cfg.video.jpeg_quality,
        )
    return root


def copy_video(src: Path, dst: Path, n_frames: int) -> Path:
    """Copy the first frames of the scenes of ``src/training`` (about ``n_frames`` / 2 each)."""
    scenes = sorted(p for p in (src / "training").iterdir() if p.is_dir() and any(p.glob("*.jpg")))
    if not scenes:
        raise SystemExit(f"{src}/training holds no scene folder with *.jpg frames")
    per_scene = math.ceil(n_frames / min(SCENES, len(scenes)))
    left = n_frames
    for scene in scenes:
        if left <= 0:
            break
        out = dst / "training" / scene.name
        out.mkdir(parents=True)
        shutil.copy2(scene / "cam.txt", out / "cam.txt")
        for jpg in sorted(scene.glob("*.jpg"))[: min(per_scene, left)]:
            shutil.copy2(jpg, out / jpg.name)
            left -= 1
    return dst


# ----------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak_rss() -> float:
    """Reset the resident-set high-water mark where Linux allows it; the baseline (MiB)."""
    try:
        # Freed heap pages (the checkpoint's tensors) stay resident until trimmed and would be
        # reused by the activations unseen: hand them back first, so the baseline is honest.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _rss_mb()
    except OSError:
        return maxrss_mb()  # as video_step.py: growth of the maximum since here


# ----------------------------------------------------------------------------- teachers


def make_teacher(cfg: dict, folder: Path, device: str) -> Teacher:
    """The row's teacher from a spec string, with random weights saved under ``folder``."""
    torch.manual_seed(0)
    if cfg["kind"] == "leres":
        from mesadepth.models.leres import build_leres

        path = folder / f"leres_{cfg['backbone']}_random.pth"
        model = build_leres(cfg["backbone"])
        torch.save(model.state_dict(), path)
        del model
        spec = f"leres:{cfg['backbone']}:{path}"
    else:
        from mesadepth.models.backbone import build_encoder
        from mesadepth.models.depth_head import DepthModel, save_depth_model

        # configs/demo/teacher.yaml: tiny-cpu at the 96 px crop, window 6, head filters 32.
        encoder = build_encoder("tiny-cpu", img_size=96, window_size=6, layer_norm_eps=1e-6)
        model = DepthModel.from_encoder(encoder, num_filters=(32, 32, 32), max_depth=10.0)
        path = save_depth_model(model.eval(), folder / "model.safetensors")
        del model, encoder
        spec = f"mesadepth:{path}"
    return build_teacher(spec, device=device)


def bench(name: str, frames: int, device: str, size: tuple[int, int], video: Path | None) -> dict:
    cfg = CONFIGS[name]
    bs = cfg["batch"]
    with tempfile.TemporaryDirectory(prefix="pseudo_depth_bench_") as tmp:
        tmp = Path(tmp)
        data = tmp / "video"
        # The tree holds whole batches, as a long scene would.
        n_tree = max(frames, bs * SCENES)
        if video is not None:
            copy_video(video, data, n_tree)
        else:
            render_video(data, n_tree, size)
        jpgs = sorted(data.glob("training/*/*.jpg"))
        from mesadepth.io import read_rgb

        images = [read_rgb(p) for p in jpgs]
        teacher = make_teacher(cfg, tmp, device)
        model = teacher.model  # type: ignore[attr-defined]
        params = sum(p.numel() for p in model.parameters())
        n_calls = math.ceil(frames / bs)
        batches = [[images[(k * bs + i) % len(images)] for i in range(bs)] for k in range(n_calls)]

        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss0 = _reset_peak_rss()
        teacher.predict(batches[0])  # warm-up: allocator, kernels, thread pools
        # predict returns NumPy arrays, so every call ends synchronised with the device.
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            teacher.predict(batch)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_model = n_calls * bs
        h, w = images[0].shape[:2]
        side = teacher.input_size if cfg["kind"] == "leres" else teacher.side  # type: ignore[attr-defined]
        row = {
            "config": name,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(),
            "frame": f"{h}x{w}",
            "input": f"{side}x{side}",
            "resize": getattr(teacher, "resize", "torch"),
            "batch": bs,
            "params_M": round(params / 1e6, 2),
            "model_frames": n_model,
            "model_fps": round(n_model / dt, 3),
            "model_cpu_s_per_frame": round(cpu / n_model, 3),
        }
        if cfg["e2e"]:
            t0, c0 = time.perf_counter(), time.process_time()
            summary = write_pseudo_depth_tree(
                teacher, data, batch_size=bs, overwrite=True, progress=False
            )
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = summary["frames_written"]
            if n != len(jpgs):
                raise RuntimeError(f"end-to-end wrote {n} maps for {len(jpgs)} frames")
            row.update(
                e2e_frames=n, e2e_fps=round(n / dt, 3), e2e_cpu_s_per_frame=round(cpu / n, 3)
            )
        if device.startswith("cuda"):
            row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            row["peak_rss_growth_MiB"] = round(maxrss_mb() - rss0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames per measurement (default per row: CPU 8 LeReS-R50, 2 X101, 32 tiny)",
    )
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one configuration")
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(CONFIGS), help="rows to skip")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch (and OpenCV) CPU threads")
    ap.add_argument(
        "--size", type=parse_size, default=(480, 640), help="rendered frame size HxW (480x640)"
    )
    ap.add_argument(
        "--video", type=Path, default=None, help="use the frames of this SC-Depth video root"
    )
    ap.add_argument("--json", action="store_true", help="print the row as JSON (internal)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import cv2  # type: ignore[import-not-found]

            cv2.setNumThreads(args.threads)
        except ImportError:
            pass
    if args.only:
        frames = args.frames or default_frames(args.only, args.device)
        row = bench(args.only, frames, args.device, args.size, args.video)
        print(json.dumps(row) if args.json else row)
        return
    names = [n for n in CONFIGS if n not in args.skip]
    with tempfile.TemporaryDirectory(prefix="pseudo_depth_video_") as tmp:
        video = args.video
        if video is None:
            # Rendered once for all rows; each row copies the frames it needs.
            need = max(
                max(args.frames or default_frames(n, args.device), CONFIGS[n]["batch"] * SCENES)
                for n in names
            )
            video = render_video(Path(tmp) / "video", need, args.size)
        rows = []
        for name in names:
            extra = ["--device", args.device, "--video", str(video)]
            if args.frames:
                extra += ["--frames", str(args.frames)]
            if args.threads:
                extra += ["--threads", str(args.threads)]
            rows.append(row_in_subprocess(__file__, name, extra))
    print_table(rows)


if __name__ == "__main__":
    main()
