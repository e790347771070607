"""One prepared device check: the paper-scale stages (Swin-v2-L) and the faithful GP regime.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json   # one H100, ~6 min
    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --smoke --out /tmp/smoke.json  # CPU, seconds
    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --device cpu --batch 1 --steps 1 \\
        --no-search --budget-s 1e9 --only mp ft ev               # Swin-v2-L rows on a CPU

Preparation on the GPU machine (no package registry; Python 3.12 with its own torch, lightning,
timm, safetensors, h5py, scipy, opencv, matplotlib, tensorboard, tqdm, pyyaml, pillow; no lmdb):
nothing to install. Run from the repository root with ``PYTHONPATH=$PWD`` (mesadepth is imported
from the checkout, not pip-installed). Only ``mesadepth.data.lsun`` imports lmdb, through the
world generator; the world rendered here has no LSUN part, so a placeholder module stands in
for a missing lmdb in the rendering process.

Stage rows build the module of each ``configs/paper/*.yaml`` recipe with random weights and feed
synthetic tensors of the recipe's shapes: ``MP 192`` (SimMIM, bf16-mixed as its recipe),
``GP 480`` (SC-DepthV2 + ARN), ``SP 480`` (SC-DepthV3), ``FT 480`` (fine-tuning), fp32 as their
recipes, each repeated under bf16 autocast (the documented option) without the batch search, and
``EV 480`` (the NYUv2 protocol: flip + 2 windows = 4 crops per 480x640 image). Columns:

- ``batch``: the recipe's per-GPU batch (EV: test images per call), halved until it fits;
  ``img_s``: images (GP/SP: target frames; EV: test images) per second;
- ``data/fwd/bwd/opt_ms``: one step, synchronised between phases: the copy of a ready pinned
  batch to the device (not the loader: the GP-learn rows measure that), forward + loss,
  backward, clipping + optimizer step (EV: data = the protocol's work outside the forwards);
- ``peak_GiB``: ``torch.cuda.max_memory_allocated`` (CPU: the process's max RSS);
- ``TFLOP``: one step's FLOPs by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv,
  attention); ``MFU``: those per second over the bf16 peak (``--peak-tflops``, default 989 =
  H100 SXM dense bf16), whatever the row's precision;
- ``max_batch`` / ``max_img_s`` / ``max_GiB`` / ``stop``: a doubling search from the recipe's
  batch, ended by ``oom``, ``cap`` (``--search-cap`` x the batch) or ``time``;
- ``exp_GiB``, ``exp_img_s`` (estimates, issue 20 item 3): 4 bytes per parameter + 12 per
  trainable one (gradient, Adam's moments) + the bytes autograd saved per image on the FLOP step
  x the recipe's batch (EV: weights + 2 x the largest saved activation per crop); FLOPs per image
  at 40 % of the precision's peak (fp32: ``--fp32-peak-tflops``, default 67 = H100 SXM without
  tensor cores, PyTorch's default for fp32 matmuls).

GP-learn rows: configs/paper/geometric.yaml (reference PoseNet and ARN from scratch, width 64,
pose.scale 0.01, reference warp and padding, Adam 1e-4, fp32), changed only where this check
needs it: random init (no MP file), the demo's tiny Swin-v2 at 192x256, batch 8 on one device
(the reference's batch), on 14 + 2 rooms of 256x192 frames turning 0.5 degrees per frame
(README "GP on CPU": at 2 degrees the rotational flow is beyond L_photo's basin), rendered in the
background while the stage rows run. It trains ``--gp-seconds``, validating every 500 steps, and
reports the held-out AbsRel (start, end, a constant map's), ``pose_t_cos``, ``pose_pair_cos`` and
the steps; ``--gp-set key=value`` changes the recipe. A second row trains with
``pose.source=poses`` (the true motion) when the checkout's PoseConfig has that key.

Every phase respects ``--budget-s``: what does not fit is skipped with a note. Progress is
printed as it happens and the JSON rewritten after every row, so a killed run keeps its rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import maxrss_mb, print_table
from video_step import make_batch as video_batch

from mesadepth.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
ROWS = ("mp", "gp", "sp", "ft", "ev", "learn")
_T0 = [time.perf_counter()]

# Recipe / world overrides per scale: "paper" keeps each recipe (random weights, no data paths);
# "smoke" runs the same code on the tiny CPU encoder (the ARN halves its input, so 64-px GP
# batches need 2 images for BatchNorm).
SCALES: dict[str, dict[str, list[str]]] = {
    "paper": {
        "mp": [],
        "video": "encoder.preset=swinv2_large_window12_192 "
        "encoder.pretrained_window_sizes=[12,12,12,6]".split(),
        "ft": ["init=random"],
        "world": "image.width=256 image.height=192 video.train_scenes=14 video.val_scenes=2 "
        "video.frames=40 video.rot_deg=0.5".split(),
        "learn": "data.size=[192,256] data.batch_size=8 data.num_workers=8 optim.epochs=1000 "
        "optim.epoch_size=500".split(),
    },
    "smoke": {
        "mp": "encoder.preset=tiny-cpu encoder.img_size=64 data.img_size=64 mask.patch_size=16 "
        "loss.norm_target_patch_size=15 data.batch_size=4".split(),
        "video": "encoder.preset=tiny-cpu encoder.window_size=4 encoder.pretrained_window_sizes=0 "
        "data.size=[64,64] data.batch_size=2 pose.width=8".split(),
        "ft": "init=random encoder.preset=tiny-cpu encoder.window_size=4 "
        "encoder.pretrained_window_sizes=0 data.crop=[64,64]".split(),
        "world": "video.train_scenes=2 video.val_scenes=1 video.frames=8".split(),
        "learn": "data.size=[64,64] pose.width=8 data.batch_size=2 data.num_workers=0 "
        "optim.epochs=1 optim.epoch_size=2 trainer.max_steps=2".split(),
    },
}
VIDEO_COMMON = ["init=random", "pose.pretrained=null", 'data.root=""']
WORLD_COMMON = "nyu.labeled_scenes=0 lsun.per_category=0 ibims.images=0 aux.scenes=0 checks=false"
LEARN_COMMON = (
    "init=random pose.pretrained=null encoder.preset=tiny-cpu encoder.window_size=4 "
    "encoder.pretrained_window_sizes=0 trainer.devices=1 trainer.strategy=auto "
    "trainer.sync_batchnorm=false trainer.num_sanity_val_steps=0 trainer.progress_bar=false "
    "trainer.log_every_n_steps=50 trainer.checkpoint_every_n_steps=0 figures=0"
).split()
POSES_MIN_S = 20  # the pose.source=poses row gives way to the PoseNet row down to this
EV_IMAGE = {"paper": (480, 640), "smoke": (48, 64)}


def log(msg: str) -> None:
    t = time.perf_counter() - _T0[0]
    print(f"[{t:6.1f} s, cpu {time.process_time():6.1f} s] {msg}", flush=True)


def clock(dev: str) -> float:
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def tree(x: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``f`` on every tensor of a batch (dicts and lists of tensors)."""
    if isinstance(x, torch.Tensor):
        return f(x)
    if isinstance(x, dict):
        return {k: tree(v, f) for k, v in x.items()}
    return [tree(v, f) for v in x] if isinstance(x, list) else x


def peak_gib(dev: str, reset: bool = False) -> float:
    if dev != "cuda":
        return maxrss_mb() / 1024
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**30


def free(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def autocast(dev: str, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def saved_bytes(model: torch.nn.Module):
    """Yields {storage pointer: bytes} of what autograd saves for backward in the block
    (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def flop_counter() -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


# ----------------------------------------------------------------------------- the stages


@dataclasses.dataclass
class Stage:
    """One training stage as the check drives it: inputs, loss, optimizer."""

    name: str
    precision: str  # "bf16" (autocast) or "fp32", as the recipe's trainer.precision
    batch: int  # the recipe's per-GPU batch
    model: torch.nn.Module
    make: Callable[[int], dict]  # n -> a CPU batch of n
    loss: Callable[[dict], torch.Tensor]
    opt: torch.optim.Optimizer
    clip: float | None = None


def _precision(p: str) -> str:
    return "bf16" if p.startswith("bf16") else "fp32"


def build_mp(scale: str, dev: str) -> Stage:
    from mesadepth.models.simmim import MaskGenerator
    from mesadepth.optim import param_groups_no_decay, scaled_lr
    from mesadepth.stages.masked import MaskedPretraining, MaskedRecipe

    r = load_config(MaskedRecipe, PAPER / "masked.yaml", SCALES[scale]["mp"])
    m = MaskedPretraining(r).to(dev)
    o, size, t = r.optim, r.data.img_size, r.trainer
    groups = param_groups_no_decay(m.model, o.weight_decay, rule=o.no_decay_rule)
    lr = scaled_lr(o.lr_per_512, r.data.batch_size * t.devices * t.accumulate_grad_batches)
    opt = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=lr,
        betas=o.betas,
        eps=o.eps,
    )
    masks = MaskGenerator(size, r.mask.patch_size, 4, r.mask.ratio)

    def make(n: int) -> dict:
        rng = np.random.default_rng(n)
        mask = torch.from_numpy(np.stack([masks(rng) for _ in range(n)]).astype(np.int64))
        gen = torch.Generator().manual_seed(n)
        return {"image": torch.randn(n, 3, size, size, generator=gen), "mask": mask}

    def loss(b: dict) -> torch.Tensor:
        return m.model(b["image"], b["mask"])[0]

    prec = _precision(t.precision)
    return Stage(f"MP {size}", prec, r.data.batch_size, m, make, loss, opt, t.gradient_clip_val)


def build_video(scale: str, dev: str, version: str) -> Stage:
    from mesadepth.stages.video import VideoPretraining, VideoRecipe

    path = PAPER / ("geometric.yaml" if version == "v2" else "supervised.yaml")
    r = load_config(VideoRecipe, path, [*VIDEO_COMMON, *SCALES[scale]["video"]])
    m = VideoPretraining(r).to(dev)
    (h, w), name = r.data.size, "GP" if version == "v2" else "SP"
    return Stage(
        f"{name} {h}",
        _precision(r.trainer.precision),
        r.data.batch_size,
        m,
        lambda n: video_batch({"version": version, "size": (h, w), "batch": n}, "cpu"),
        lambda b: m.step_terms(b)["total"],
        m.configure_optimizers(),
        r.trainer.gradient_clip_val,
    )


def build_ft(scale: str, dev: str) -> tuple[Stage, Any]:
    from mesadepth.losses.silog import silog_loss
    from mesadepth.optim import param_groups_layer_decay
    from mesadepth.stages.finetune import FinetuneRecipe, Finetuning

    r = load_config(FinetuneRecipe, PAPER / "finetune.yaml", SCALES[scale]["ft"])
    m = Finetuning(r).to(dev)
    o, (h, w) = r.optim, r.data.crop_size()
    groups = param_groups_layer_decay(m.model, o.weight_decay, o.layer_decay, m.depths)
    opt = torch.optim.AdamW(groups, lr=o.max_lr, betas=o.betas, eps=o.eps)

    def make(n: int) -> dict:
        g = torch.Generator().manual_seed(n)
        image = torch.rand(n, 3, h, w, generator=g)
        return {"image": image, "depth": 0.5 + 9 * torch.rand(n, 1, h, w, generator=g)}

    def loss(b: dict) -> torch.Tensor:
        return silog_loss(m.model(b["image"]), b["depth"], lambd=r.loss.silog_lambda)

    prec = _precision(r.trainer.precision)
    return Stage(f"FT {h}", prec, r.data.batch_size, m, make, loss, opt), r


# ----------------------------------------------------------------------------- measurements


def train_step(st: Stage, cpu_batch: dict, dev: str, precision: str) -> tuple[list[float], float]:
    """One step, synchronised between phases: ([data, forward, backward, optimizer] s, loss)."""
    t = [clock(dev)]
    b = tree(cpu_batch, lambda x: x.to(dev, non_blocking=True))
    t.append(clock(dev))
    with autocast(dev, precision):
        loss = st.loss(b)
    t.append(clock(dev))
    loss.backward()
    t.append(clock(dev))
    if st.clip:
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), st.clip)
    st.opt.step()
    st.opt.zero_grad(set_to_none=True)
    t.append(clock(dev))
    return list(np.diff(t)), float(loss.detach().float())


def pinned(st: Stage, n: int, dev: str) -> dict:
    return tree(st.make(n), lambda x: x.pin_memory()) if dev == "cuda" else st.make(n)


def try_batch(st: Stage, n: int, dev: str, precision: str) -> tuple[float, float, float] | None:
    """(images/s of the second of two steps, peak GiB, step s) at batch n; None on OOM."""
    oom = False
    try:
        cpu = pinned(st, n, dev)
        peak_gib(dev, reset=True)
        train_step(st, cpu, dev, precision)
        step = sum(train_step(st, cpu, dev, precision)[0])
        return n / step, peak_gib(dev), step
    except torch.cuda.OutOfMemoryError:
        oom = True
    finally:
        st.opt.zero_grad(set_to_none=True)
    if oom:  # outside the except block, so the traceback's frames (and tensors) are gone
        free(dev)
    return None


def search(
    trial: Callable[[int], tuple[float, float, float] | None], start: int, cap: int, seconds: float
) -> dict:
    """Double the batch from ``start`` until OOM, ``cap`` x start, or ``seconds`` are spent."""
    t_end = time.perf_counter() + seconds
    best: tuple[int, tuple[float, float, float]] | None = None
    n, stop, last_step = 2 * start, "cap", 0.0
    while n <= cap * start:
        # Two steps at twice the batch take about four of the last: do not start what won't end.
        if time.perf_counter() + 4 * last_step > t_end:
            stop = "time"
            break
        res = trial(n)
        if res is None:
            stop = "oom"
            break
        best, last_step, n = (n, res), res[2], 2 * n
    if best is None:
        return {"max_batch": start, "stop": stop}
    n, (img_s, gib, _) = best
    return {"max_batch": n, "max_img_s": img_s, "max_GiB": gib, "stop": stop}


def expectations(row: dict, weight_bytes: float, act_bytes: float, args: Any) -> None:
    """``exp_GiB`` (weights + act_bytes), ``exp_img_s`` (40 % of the peak) and ``MFU``."""
    flops_per_image = row["TFLOP"] * 1e12 / row["batch"]
    peak = args.peak_tflops if row["precision"] == "bf16" else args.fp32_peak_tflops
    row["exp_GiB"] = (weight_bytes + act_bytes) / 2**30
    row["exp_img_s"] = 0.4 * peak * 1e12 / flops_per_image
    row["MFU"] = row["TFLOP"] / (row["step_ms"] / 1e3) / args.peak_tflops


def measure_train(st: Stage, precision: str, args: Any, dev: str, search_s: float) -> dict:
    asked, batch = args.batch or st.batch, args.batch or st.batch
    # Two steps first (kernels, allocator, optimizer state); halve a batch that does not fit.
    while try_batch(st, batch, dev, precision) is None:
        if batch == 1:
            raise torch.cuda.OutOfMemoryError(f"{st.name}: out of memory at batch 1")
        batch //= 2
    cpu = pinned(st, batch, dev)
    peak_gib(dev, reset=True)
    with flop_counter() as fc, saved_bytes(st.model) as seen:
        train_step(st, cpu, dev, precision)
    runs = [train_step(st, cpu, dev, precision) for _ in range(args.steps)]
    phases = np.mean([r[0] for r in runs], axis=0)
    params = [p for p in st.model.parameters()]
    row = {
        "row": st.name + (" bf16" if precision != st.precision else ""),
        "precision": precision,
        "batch": batch,
        "recipe_batch": st.batch,
        "img_s": batch / phases.sum(),
        "step_ms": 1e3 * phases.sum(),
        **{f"{k}_ms": 1e3 * v for k, v in zip(("data", "fwd", "bwd", "opt"), phases, strict=True)},
        "peak_GiB": peak_gib(dev),
        "TFLOP": fc.get_total_flops() / 1e12,
        "params_M": sum(p.numel() for p in params) / 1e6,
        "loss": runs[-1][1],
    }
    weights = sum((16 if p.requires_grad else 4) * p.numel() for p in params)
    expectations(row, weights, sum(seen.values()) / batch * st.batch, args)
    del cpu
    if batch < asked:
        row.update(max_batch=batch, stop="oom", note=f"batch {asked}: out of memory")
    elif search_s > 0:
        trial = lambda n: try_batch(st, n, dev, precision)  # noqa: E731
        row.update(search(trial, batch, args.search_cap, search_s))
    return row


def measure_eval(
    model: Any, recipe: Any, scale: str, precision: str, args: Any, dev: str, search_s: float
) -> dict:
    """The NYUv2 protocol (spec 2.8) on random uint8 images; forward time from model hooks."""
    from mesadepth.evaluation.evaluate import model_batch_predictor

    v, (h, w), rng = recipe.validation, EV_IMAGE[scale], np.random.default_rng(0)
    predict = model_batch_predictor(model, dev, flip=v.flip, shift_window=v.shift_window)
    fwd = [0.0, 0.0]  # total forward seconds, start of the current forward
    hooks = [
        model.register_forward_pre_hook(lambda *_: fwd.__setitem__(1, clock(dev))),
        model.register_forward_hook(lambda *_: fwd.__setitem__(0, fwd[0] + clock(dev) - fwd[1])),
    ]

    def run(n: int) -> float:
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
        t0 = clock(dev)
        with autocast(dev, precision):
            predict(images)
        return clock(dev) - t0

    def trial(n: int) -> tuple[float, float, float] | None:
        oom = False
        try:
            peak_gib(dev, reset=True)
            dt = [run(n), run(n)][1]
            return n / dt, peak_gib(dev), dt
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:
            free(dev)
        return None

    try:
        batch = args.batch or 1
        run(batch)  # warm-up
        peak_gib(dev, reset=True)
        with flop_counter() as fc:
            run(batch)
        fwd[0] = 0.0
        total = sum(run(batch) for _ in range(args.steps)) / args.steps
        forward = fwd[0] / args.steps
        side = recipe.data.crop_size()
        with saved_bytes(model) as seen, autocast(dev, precision):
            model(torch.rand(1, 3, *side, device=dev))  # one crop under autograd: activations
        params = sum(p.numel() for p in model.parameters())
        row = {
            "row": f"EV {side[0]} (flip+2 win)" + (" bf16" if precision == "bf16" else ""),
            "precision": precision,
            "batch": batch,
            "recipe_batch": 1,
            "img_s": batch / total,
            "step_ms": 1e3 * total,
            "data_ms": 1e3 * (total - forward),
            "fwd_ms": 1e3 * forward,
            "peak_GiB": peak_gib(dev),
            "TFLOP": fc.get_total_flops() / 1e12,
            "params_M": params / 1e6,
        }
        expectations(row, 4 * params, 2 * 4 * batch * max(seen.values(), default=0), args)
        if search_s > 0:
            row.update(search(trial, batch, args.search_cap, search_s))
        return row
    finally:
        for hk in hooks:
            hk.remove()


# ----------------------------------------------------------------------------- GP learning


def render_world(out: str, scale: str, extra: list[str]) -> None:
    """The GP-learn world (video only), in this process (run as ``--render-world``)."""
    try:
        import lmdb  # noqa: F401
    except ImportError:  # mesadepth.data.lsun imports it; no LSUN is written here
        sys.modules["lmdb"] = types.ModuleType("lmdb")
    from mesadepth.data.world import PRESETS, SynthConfig, generate_world

    preset = "tiny" if scale == "smoke" else "small"
    workers = 1 if scale == "smoke" else max(1, (os.cpu_count() or 2) - 2)
    over = [*SCALES[scale]["world"], *WORLD_COMMON.split(), f"workers={workers}", *extra]
    cfg = load_config(SynthConfig, None, over, base={"preset": preset, **PRESETS[preset]})
    generate_world(cfg, out, overwrite=True, progress=False)


def start_world(out: Path, scale: str, extra: list[str]) -> subprocess.Popen:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--render-world", str(out), "--scale", scale]
    cmd += ["--gp-world", *extra] if extra else []
    with open(out.parent / "world.log", "w") as log_file:
        return subprocess.Popen(  # niced: the stage rows' kernel launches come first
            cmd,
            env={**os.environ, "PYTHONPATH": path},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.nice(10),
        )


def pose_source_available() -> bool:
    from mesadepth.stages.video import PoseConfig

    return "source" in {f.name for f in dataclasses.fields(PoseConfig)}


def gp_learn(
    name: str, world: Path, work: Path, seconds: float, extra: list[str], args: Any
) -> dict:
    """Train the GP-learn recipe for ``seconds``; held-out AbsRel and PoseNet scores."""
    import lightning as L

    from mesadepth.stages.video import VideoRecipe, run_video

    run_dir = work / name.replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    over = [*LEARN_COMMON, *SCALES[args.scale]["learn"], f"trainer.accelerator={accelerator}"]
    over += [f"data.root={world / 'video'}", f"run_dir={run_dir}", *extra, *args.gp_set]
    recipe = load_config(VideoRecipe, PAPER / "geometric.yaml", over)
    curve: list[dict] = []

    class TimeBox(L.Callback):
        """Stops after ``seconds``; adds up batch compute and data waits, records validations."""

        compute, wait, last, t0, t_batch = 0.0, 0.0, None, 0.0, 0.0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.last = None  # worker start-up at an epoch boundary is not a per-batch wait

        def on_train_batch_start(self, trainer: Any, module: Any, *_: Any) -> None:
            self.t_batch = time.perf_counter()
            self.wait += self.t_batch - self.last if self.last is not None else 0.0

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *_: Any) -> None:
            self.last = time.perf_counter()
            self.compute += self.last - self.t_batch
            if trainer.global_step % 250 == 0:
                log(f"{name}: step {trainer.global_step}, loss {float(outputs['loss']):.4f}")
            trainer.should_stop = trainer.should_stop or self.last - self.t0 > seconds

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            val, self.last = module.last_validation or {}, None
            if val:
                keys = ("step", "abs_rel", "pose_t_cos", "pose_pair_cos")
                curve.append({k: val[k] for k in keys if k in val})
                log(f"{name}: validation {curve[-1]}")

    box = TimeBox()
    m = run_video(recipe, callbacks=(box,))
    start, end = m.get("validation_start", {}), m.get("validation", {})
    loop = box.compute + box.wait
    row = {
        "row": name,
        "steps": int(m["steps"]),
        "train_s": m.get("train_seconds"),
        "snippets_s": int(m["steps"]) * recipe.data.batch_size / loop if loop else None,
        "data_wait_share": box.wait / loop if loop else None,
        "abs_rel_start": start.get("abs_rel"),
        "abs_rel_end": end.get("abs_rel"),
        "abs_rel_const": m.get("baseline_constant_depth", {}).get("abs_rel"),
        "pose_t_cos_start": start.get("pose_t_cos"),
        **{k: end.get(k) for k in ("pose_t_cos", "pose_pair_cos")},
        **{k: end.get(k) for k in ("pose_rot_err_deg", "pose_rot_none_deg")},
        "photo_start": m.get("loss_start", {}).get("photo"),
        "photo_end": m.get("loss_end", {}).get("photo"),
        "curve": curve,
    }
    if row["abs_rel_end"] and row["abs_rel_const"]:
        row["end_vs_const"] = row["abs_rel_end"] / row["abs_rel_const"]
    return row


# ----------------------------------------------------------------------------- the run


STAGE_COLS = ("row", "precision", "batch", "img_s", "data_ms", "fwd_ms", "bwd_ms", "opt_ms",
              "peak_GiB", "TFLOP", "MFU", "max_batch", "max_img_s", "max_GiB", "stop",
              "exp_GiB", "exp_img_s")  # fmt: skip
LEARN_COLS = ("row", "steps", "train_s", "snippets_s", "data_wait_share", "abs_rel_start",
              "abs_rel_end", "abs_rel_const", "end_vs_const", "pose_t_cos_start", "pose_t_cos",
              "pose_pair_cos", "pose_rot_err_deg", "pose_rot_none_deg")  # fmt: skip


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return [_round(v) for v in x] if isinstance(x, list) else x


class Check:
    """The run: rows in order, the budget, the JSON rewritten after every row."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None) -> None:
        import lightning
        import timm

        self.args, self.dev, self.out = args, args.device, Path(args.out)
        # Not under --out's folder: a GPU machine sends that folder back, checkpoints included.
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.reserve = 0.0
        cuda = self.dev == "cuda"
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "versions": {
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "timm": timm.__version__,
            },
            "cpu_count": os.cpu_count(),
            "tf32": {
                "matmul": torch.backends.cuda.matmul.allow_tf32,
                "cudnn": torch.backends.cudnn.allow_tf32,
            },
            "peak_tflops": args.peak_tflops,
            "fp32_peak_tflops": args.fp32_peak_tflops,
            "argv": sys.argv[1:] if argv is None else argv,
            "memory": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
        }
        self.report: dict[str, Any] = {"meta": meta, "rows": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - _T0[0])

    def add(self, row: dict) -> None:
        self.report["rows"].append(_round(row))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1))
        tmp.replace(self.out)
        log(" | ".join(f"{k} {v}" for k, v in self.report["rows"][-1].items() if k != "curve"))

    def row(self, name: str, fn: Callable[[], dict | list[dict]], need: float) -> None:
        """Run ``fn`` if ``need`` seconds are left besides the reserve; errors become rows."""
        if self.left() - self.reserve < need:
            self.add({"row": name, "note": f"skipped: {self.left():.0f} s of the budget left"})
            return
        log(f"{name} ...")
        try:
            res = fn()
        except Exception as exc:  # one failing row must not lose the others
            traceback.print_exc()
            res = {"row": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        for r in res if isinstance(res, list) else [res]:
            self.add(r)
        free(self.dev)

    def search_s(self) -> float:
        a = self.args
        return 0.0 if a.no_search else max(0.0, min(a.search_s, self.left() - self.reserve - 15))

    def train_rows(self, st: Stage) -> list[dict]:
        a, dev = self.args, self.dev
        rows = [measure_train(st, st.precision, a, dev, self.search_s())]
        if st.precision != "bf16" and not a.no_bf16_rows and self.left() - self.reserve > 15:
            try:
                rows.append(measure_train(st, "bf16", a, dev, 0.0))
            except Exception as exc:
                traceback.print_exc()
                rows.append({"row": f"{st.name} bf16", "error": f"{type(exc).__name__}: {exc}"})
        return rows

    def ft_ev(self) -> list[dict]:
        a, dev = self.args, self.dev
        st, recipe = build_ft(a.scale, dev)
        rows = self.train_rows(st) if "ft" in a.only else []
        if "ev" in a.only:
            st.opt.zero_grad(set_to_none=True)
            st.opt.state.clear()  # the optimizer's moments are no part of evaluation
            free(dev)
            model = st.model.model
            rows.append(measure_eval(model, recipe, a.scale, "fp32", a, dev, self.search_s()))
            if a.no_bf16_rows:
                pass
            elif self.left() - self.reserve < 10:
                rows.append({"row": "EV bf16", "note": "skipped: budget"})
            else:
                rows.append(measure_eval(model, recipe, a.scale, "bf16", a, dev, 0.0))
        return rows

    def learn(self, proc: subprocess.Popen, world: Path, t_world: float) -> None:
        try:
            failed = proc.wait(timeout=max(1.0, self.left() - 30))
        except subprocess.TimeoutExpired:
            proc.kill()
            failed = "still rendering"
        if failed:
            tail = (world.parent / "world.log").read_text()[-400:]
            self.add({"row": "GP-learn", "error": f"world: {failed}, log ends: {tail}"})
            return
        manifest = json.loads((world / "manifest.json").read_text())
        self.report["meta"]["world"] = {
            "counts": manifest["counts"],
            "image_size": manifest["image_size"],
            "render_s": manifest["seconds"]["total"],
            "ready_after_s": time.perf_counter() - t_world,
        }
        has_source = pose_source_available()
        runs = [("GP-learn posenet", [], self.args.gp_seconds)]
        if has_source:
            runs.append(("GP-learn poses", ["pose.source=poses"], self.args.gp_poses_seconds))
        self.reserve = 0.0
        for i, (name, extra, seconds) in enumerate(runs):
            secs = min(seconds, self.left() - 15 - (POSES_MIN_S + 15) * (len(runs) - 1 - i))
            if secs < 10:
                self.add({"row": name, "note": f"skipped: {self.left():.0f} s of the budget left"})
                continue
            learn = partial(gp_learn, name, world, self.work, secs, extra, self.args)
            self.row(name, learn, -1)
        if not has_source:
            note = "skipped: this checkout's PoseConfig has no `source` key"
            self.add({"row": "GP-learn poses", "note": note})

    def run(self) -> dict:
        a, dev = self.args, self.dev
        log(f"gpu_check on {self.report['meta']['device']}, budget {a.budget_s:.0f} s")
        world = self.work / "world"
        proc, t_world = None, time.perf_counter()
        if "learn" in a.only:
            proc = start_world(world, a.scale, a.gp_world)
            # Kept for GP-learn: its time (+ set-up, validations, export) and the poses row's least.
            self.reserve = a.gp_seconds + 25 + (POSES_MIN_S + 15) * pose_source_available()
        need = 5 if a.smoke else 25
        builds = {
            "mp": lambda: build_mp(a.scale, dev),
            "gp": lambda: build_video(a.scale, dev, "v2"),
            "sp": lambda: build_video(a.scale, dev, "v3"),
        }
        for key, build in builds.items():
            if key in a.only:
                self.row(key.upper(), lambda b=build: self.train_rows(b()), need)
        if "ft" in a.only or "ev" in a.only:
            self.row("FT/EV", self.ft_ev, need)
        if proc is not None:
            self.learn(proc, world, t_world)
        if not a.work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.report["meta"]["total_s"] = time.perf_counter() - _T0[0]
        self.out.write_text(json.dumps(self.report, indent=1))
        rows = self.report["rows"]
        for keep, cols in ((False, STAGE_COLS), (True, LEARN_COLS)):
            part = [r for r in rows if r["row"].startswith("GP-learn") == keep]
            if part:
                extra = [c for c in ("note", "error") if any(c in r for r in part)]
                print_table([{c: r.get(c, "") for c in (*cols, *extra)} for r in part])
                print(flush=True)
        log(f"done: {self.out}")
        return self.report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="gpu_check.json", help="JSON, rewritten after every row")
    ap.add_argument("--smoke", action="store_true", help="every row for 2 steps on CPU, tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row")
    ap.add_argument("--batch", type=int, help="batch of every stage row (default: the recipe's)")
    ap.add_argument("--budget-s", type=float, help="wall seconds (default 340; smoke: none)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--gp-seconds", type=float, default=150.0, help="GP-learn training time")
    ap.add_argument("--gp-poses-seconds", type=float, default=60.0, help="the poses row's")
    ap.add_argument("--gp-set", nargs="*", default=[], help="GP-learn recipe key=value")
    ap.add_argument("--gp-world", nargs="*", default=[], help="GP-learn world key=value")
    ap.add_argument("--search-cap", type=int, default=16, help="largest batch / recipe batch")
    ap.add_argument("--search-s", type=float, default=20.0, help="seconds per batch search")
    ap.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--no-bf16-rows", action="store_true", help="skip the bf16 option rows")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak")
    ap.add_argument("--fp32-peak-tflops", type=float, default=67.0, help="device fp32 peak")
    ap.add_argument("--work", help="folder for the world and GP-learn runs (default: temporary)")
    ap.add_argument("--render-world", help=argparse.SUPPRESS)
    ap.add_argument("--scale", default="paper", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.steps, args.search_cap, args.scale = "cpu", 2, 2, "smoke"
    if args.budget_s is None:
        args.budget_s = math.inf if args.smoke else 340.0
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render_world:
        render_world(args.render_world, args.scale, args.gp_world)
        return {}
    _T0[0] = time.perf_counter()
    return Check(args, argv).run()


if __name__ == "__main__":
    main()
