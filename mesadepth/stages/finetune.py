"""Depth fine-tuning on NYUv2, the Xie et al. 2022 recipe MeSa uses (spec masked-pretraining sec. 2).

``mesadepth finetune --config RECIPE [key=value ...]`` trains a
:class:`~mesadepth.models.depth_head.DepthModel` (the shared Swin-v2 encoder, only its last
stage feeding the deconvolution head of spec 2.2) with the SILog loss of spec 2.3 on the NYUv2
"sync" pairs (or SC-Depth video folders with ground truth), and writes into the run directory:

- ``config.yaml`` (the resolved recipe), ``checkpoints/last.ckpt`` (resume), ``logs/``;
- ``model.safetensors``: ``encoder.*`` + ``decoder.*`` with the head config
  (:func:`~mesadepth.models.depth_head.save_depth_model`, metadata ``stage=finetune`` and the
  ``init`` it started from); its ``encoder.*`` part is an ordinary encoder file for ``cka``;
- ``metrics.json``: the loss curve's start and end, the NYUv2-protocol metrics of the final
  model on the labeled test split (spec 2.8: d1 d2 d3 abs_rel sq_rel rmse rmse_log log10
  silog, per-image means), the same metrics for a constant prediction of the training-set mean
  depth (the floor any useful model must beat), and the validation history;
- ``figures/depth_preview.png``: image | ground truth | prediction for a few test images on one
  shared colour scale.

The recipe, in the order of the spec:

- encoder (2.1, 2.7): built for the crop size (timm fixes the input size, pitfall 34) with the
  fine-tuning windows; ``init`` is an ``encoder.*`` safetensors file of any earlier stage (MP,
  MP+GP, MP+GP+SP), an official SimMIM / Swin-v2 / MIM-Depth checkpoint (``.pth``), or
  ``random``. ``encoder.pretrained_window_sizes: auto`` takes the windows the init file was
  trained with (clipped to its token maps: (12, 12, 12, 6) for 192 px / window 12), which is
  what the continuous position bias must be normalised by (pitfall 10);
- data (2.4): MIM-Depth's augmentation (:class:`~mesadepth.data.nyu_augment.MIMTrainTransform`),
  CutDepth on every 4th sample. The reference drives CutDepth with a counter per loader
  worker; here the counter is the sample's position in the epoch's global order (over all
  devices), which marks the same samples (0, 4, ..., 20 of every batch of 24) whenever the
  total batch is a multiple of ``cutdepth_every``, and does not depend on the worker count, so
  a resumed epoch repeats exactly. Augmentation draws are seeded by (seed, epoch, index);
- optimizer (2.5): AdamW, layer-wise lr decay groups of
  :func:`~mesadepth.optim.param_groups_layer_decay` (0.85 for L: scale 0.85^(28 - id));
- schedule (2.6): the triangle of :class:`~mesadepth.optim.TriangleLR` stepped per iteration
  (ramp up over floor(E/2) epochs, then down; pitfall 12), no lr scaling with batch size, no
  clipping;
- validation (2.8): the labeled .mat's test split, full images with flip and sliding-window
  averaging through :mod:`mesadepth.evaluation`, every ``validation.every_n_epochs`` epochs on
  global rank 0 and always for the final model (what the paper reports, pitfall 25).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mesadepth.config import save_config
from mesadepth.data.nyu_augment import MIMTrainTransform
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.evaluation.metrics import METRIC_NAMES
from mesadepth.models.backbone import (
    SWINV2_PRESETS,
    SwinV2Encoder,
    build_encoder,
    load_encoder,
    load_official_checkpoint,
    trained_window_sizes,
)
from mesadepth.models.depth_head import DepthModel, save_depth_model
from mesadepth.optim import TriangleLR, TriangleSchedule, param_groups_layer_decay
from mesadepth.training import (
    ResumableRandomSampler,
    TrainerConfig,
    fit,
    read_metrics,
    resolve_resume,
    write_metrics,
)

__all__ = [
    "EpochPositionSampler",
    "FinetuneDataConfig",
    "FinetuneEncoderConfig",
    "FinetuneRecipe",
    "Finetuning",
    "HeadConfig",
    "NYUValidation",
    "ValidationConfig",
    "build_finetune_encoder",
    "depth_preview_figure",
    "init_kind",
    "run_finetune",
    "train_loader",
    "training_mean_depth",
    "validate",
]

InitKind = Literal["encoder", "official", "random"]


# ----------------------------------------------------------------------------- the recipe


@dataclass
class FinetuneEncoderConfig:
    """The Swin-v2 to fine-tune (spec 2.1). Its input size is always ``data.crop``."""

    preset: str | None = field(
        default="swinv2_large_window30_480",
        metadata={
            "help": "encoder preset (tiny-cpu, swinv2_large_window30_480, ...); null = the "
            "architecture of the init file (init must then be an encoder .safetensors)"
        },
    )
    window_size: int | list[int] | None = field(
        default=None,
        metadata={"help": "attention window, one int or one per stage; null = the preset's"},
    )
    pretrained_window_sizes: Literal["auto"] | int | list[int] = field(
        default="auto",
        metadata={
            "help": "windows the init weights were trained with (spec pitfall 10); auto = read "
            "from the init file (clipped to its token maps), else the preset's"
        },
    )
    embed_dim: int | None = field(
        default=None, metadata={"help": "stage-0 width; null = the preset's"}
    )
    depths: list[int] | None = field(
        default=None, metadata={"help": "blocks per stage; null = the preset's"}
    )
    num_heads: list[int] | None = field(
        default=None, metadata={"help": "heads per stage; null = the preset's"}
    )
    drop_path_rate: float | None = field(
        default=0.5,
        metadata={"help": "stochastic depth (spec 2.1: 0.5 for L, 0.3 for B); null = preset's"},
    )
    layer_norm_eps: float = field(
        default=1e-6,
        metadata={"help": "LayerNorm eps (1e-6: the depth repository's encoder, pitfall 16)"},
    )

    def overrides(self) -> dict[str, Any]:
        """The explicitly set constructor arguments (pretrained windows excluded)."""
        out: dict[str, Any] = {}
        for key in ("window_size", "embed_dim", "depths", "num_heads", "drop_path_rate"):
            value = getattr(self, key)
            if value is not None:
                out[key] = tuple(value) if isinstance(value, list) else value
        out["layer_norm_eps"] = self.layer_norm_eps
        return out


@dataclass
class HeadConfig:
    """The depth head of spec 2.2 (the README's NYU settings are the defaults)."""

    num_deconv: int = field(default=3, metadata={"help": "deconvolutions (each x2)"})
    num_filters: list[int] = field(
        default_factory=lambda: [32, 32, 32], metadata={"help": "deconvolution widths"}
    )
    deconv_kernels: list[int] = field(
        default_factory=lambda: [2, 2, 2], metadata={"help": "deconvolution kernels (2, 3, 4)"}
    )
    max_depth: float = field(
        default=10.0, metadata={"help": "depth = sigmoid(.) x max_depth, metres"}
    )


@dataclass
class FinetuneDataConfig:
    """Training pairs (spec 2.4, datasets 3) and the labeled file used for validation."""

    format: Literal["sync", "video"] = field(
        default="sync",
        metadata={
            "help": "sync = NYUv2 sync pairs from a MIM/BTS list (root holds nyu_depth_v2/); "
            "video = SC-Depth folders with depth/*.png (root holds training/)"
        },
    )
    root: str = field(default="", metadata={"help": "dataset root folder (see format)"})
    train_list: str | None = field(
        default=None,
        metadata={"help": "sync: MIM/BTS train list; null = <root>/splits/train_list.txt"},
    )
    video_split: Literal["train", "val"] = field(
        default="train", metadata={"help": "video: which scene list (training/<split>.txt)"}
    )
    labeled_mat: str | None = field(
        default=None,
        metadata={"help": "nyu_depth_v2_labeled.mat; null = <root>/nyu_depth_v2_labeled.mat"},
    )
    splits_mat: str | None = field(
        default=None, metadata={"help": "splits.mat; null = beside labeled_mat"}
    )
    crop: list[int] = field(
        default_factory=lambda: [480, 480],
        metadata={"help": "random crop (height, width) = the encoder's input size"},
    )
    cutdepth_every: int = field(
        default=4, metadata={"help": "CutDepth on every n-th sample of an epoch (0: off)"}
    )
    cutdepth_p: float = field(default=0.75, metadata={"help": "CutDepth strip width factor p"})
    cutdepth_mode: Literal["reference", "corrected"] = field(
        default="reference",
        metadata={
            "help": "reference: depth in mm wrapped mod 256 (pitfall 14); corrected: grey depth"
        },
    )
    flip_p: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    colour_p: float = field(
        default=0.5, metadata={"help": "probability of each colour step (brightness, gamma, HSV)"}
    )
    batch_size: int = field(
        default=24, metadata={"help": "images per device and step (reference total: 24)"}
    )
    num_workers: int = field(default=8, metadata={"help": "DataLoader worker processes per device"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and augmentation"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "corrupt training pairs: stop, or skip and count"}
    )

    def crop_size(self) -> tuple[int, int]:
        if len(self.crop) != 2 or any(c < 1 for c in self.crop):
            raise ConfigError(f"data.crop must be [height, width] > 0, got {self.crop}")
        return int(self.crop[0]), int(self.crop[1])


@dataclass
class FinetuneOptimConfig:
    """AdamW with layer-wise lr decay (spec 2.5) on the triangle schedule (spec 2.6)."""

    max_lr: float = field(default=5e-4, metadata={"help": "peak lr (not scaled with the batch)"})
    min_lr: float = field(default=3e-5, metadata={"help": "lr at both ends of the triangle"})
    power: float = field(default=0.9, metadata={"help": "polynomial power of both ramps"})
    layer_decay: float = field(
        default=0.85, metadata={"help": "layer-wise lr decay (0.85 for L, 0.9 for B)"}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW eps"})
    schedule_epochs: int | None = field(
        default=None,
        metadata={"help": "epochs E of the triangle; null = trainer.max_epochs"},
    )


@dataclass
class FinetuneLossConfig:
    silog_lambda: float = field(
        default=0.5, metadata={"help": "SILog variance weight (spec 2.3: 0.5, no x10 scaling)"}
    )


@dataclass
class ValidationConfig:
    """NYUv2 protocol on the labeled test split (spec 2.8)."""

    enabled: bool = field(
        default=True, metadata={"help": "evaluate on the labeled test split at all"}
    )
    every_n_epochs: int = field(
        default=1, metadata={"help": "during training, every n epochs (0: only the final model)"}
    )
    flip: bool = field(default=True, metadata={"help": "flip averaging"})
    shift_window: bool = field(default=True, metadata={"help": "two sliding square windows"})
    max_images: int | None = field(
        default=None, metadata={"help": "first n test images only (null: all 654)"}
    )
    baseline_images: int = field(
        default=256,
        metadata={
            "help": "training depth maps averaged for the mean-depth baseline (0: no baseline)"
        },
    )


@dataclass
class FinetuneRecipe:
    """NYUv2 depth fine-tuning (Xie et al. 2022, MeSa). Every key can be set as key=value."""

    run_dir: str = field(
        default="runs/finetune",
        metadata={"help": "run directory (created; resumed if it holds checkpoints/last.ckpt)"},
    )
    init: str = field(
        default="random",
        metadata={
            "help": "encoder start: an encoder.* .safetensors of an earlier stage, an official "
            "SimMIM / Swin-v2 / MIM-Depth .pth, or random"
        },
    )
    encoder: FinetuneEncoderConfig = field(default_factory=FinetuneEncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    loss: FinetuneLossConfig = field(default_factory=FinetuneLossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=25))
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    figures: int = field(default=4, metadata={"help": "test images in figures/depth_preview.png"})


# ----------------------------------------------------------------------------- the encoder


def init_kind(init: str) -> InitKind:
    """``random``, ``encoder`` (a ``.safetensors`` with ``encoder.*``) or ``official`` (.pth/.pt)."""
    if not init or init == "random":
        return "random"
    suffix = Path(init).suffix.lower()
    if suffix == ".safetensors":
        return "encoder"
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return "official"
    raise ConfigError(
        f"init={init!r}: expected an encoder .safetensors (a run's model.safetensors), an "
        "official SimMIM / Swin-v2 / MIM-Depth checkpoint (.pth), or 'random'"
    )


def _file_encoder_config(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from mesadepth.models.backbone import META_CONFIG

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_CONFIG)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise DataError(path, f"not a readable safetensors file: {err}") from err
    if raw is None:
        raise DataError(
            path,
            "no encoder config in the metadata: set encoder.preset so the architecture is known",
        )
    return json.loads(raw)


def build_finetune_encoder(recipe: FinetuneRecipe) -> tuple[SwinV2Encoder, dict[str, Any]]:
    """The encoder of the recipe at the crop size, initialised from ``recipe.init`` (spec 2.7).

    Returns the encoder and a record of what was loaded (``kind``, ``path``,
    ``pretrained_window_sizes``). Missing files raise :class:`MissingFileError`; an init file
    whose keys or shapes do not match the encoder raises :class:`DataError`.
    """
    cfg = recipe.encoder
    kind = init_kind(recipe.init)
    path = Path(recipe.init)
    if kind != "random" and not path.is_file():
        raise MissingFileError(
            path,
            "init weights",
            "an encoder .safetensors written by an earlier stage (e.g. runs/.../masked/"
            "model.safetensors) or an official SimMIM / Swin-v2 .pth; or set init=random",
        )
    overrides = {**cfg.overrides(), "img_size": recipe.data.crop_size()}
    file_cfg = _file_encoder_config(path) if kind == "encoder" else None

    pws: Any = cfg.pretrained_window_sizes
    if pws == "auto":
        if file_cfg is not None:
            pws = trained_window_sizes(file_cfg)
        else:
            preset = SWINV2_PRESETS.get(cfg.preset or "", {})
            pws = preset.get("pretrained_window_sizes", 0)
            if kind == "official" and not np.any(np.asarray(pws)):
                raise ConfigError(
                    "encoder.pretrained_window_sizes=auto cannot be read from a .pth checkpoint "
                    f"and the preset {cfg.preset!r} has none: set it to the checkpoint's "
                    "pre-training windows, e.g. [12, 12, 12, 6] for a 192-px window-12 "
                    "SimMIM Swin-v2 (spec pitfall 10)"
                )
    overrides["pretrained_window_sizes"] = _as_stages(pws)

    if cfg.preset is None:
        if file_cfg is None:
            raise ConfigError(
                f"encoder.preset is null, which means 'the architecture of the init file', but "
                f"init={recipe.init!r} is not an encoder .safetensors: name a preset"
            )
        encoder = load_encoder(path, overrides=overrides, drop_mask_token=not _has_mask(path))
    else:
        encoder = build_encoder(cfg.preset, **overrides)
        if kind == "encoder":
            load_encoder(path, encoder=encoder, drop_mask_token=not _has_mask(path))
        elif kind == "official":
            report = load_official_checkpoint(path, encoder)
    info = {
        "kind": kind,
        "path": str(path) if kind != "random" else None,
        "pretrained_window_sizes": encoder.config["pretrained_window_sizes"],
    }
    if kind == "official":
        # What the import left behind (a SimMIM decoder, a depth head, a supervised classifier).
        info["dropped"], info["reinitialised"] = report.dropped, report.reinitialised
    return encoder, info


def _as_stages(value: Any) -> Any:
    """YAML lists -> the tuples the encoder constructor takes (an int passes through)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_stages(v) for v in value)
    return value


def _has_mask(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "encoder.mask_token" in f.keys()


# ----------------------------------------------------------------------------- data


class EpochPositionSampler(ResumableRandomSampler):
    """:class:`ResumableRandomSampler` that yields ``(epoch, position, index)`` triples.

    ``position`` is the index's place in the epoch's global order over all devices
    (rank + world x local position), the counter that drives CutDepth; a resumed epoch continues
    with the same positions.
    """

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch
        start = self._start if self._start_epoch == epoch else 0
        world, rank = self.num_replicas, self.rank
        indices = list(super().__iter__())
        return iter([(epoch, rank + world * (start + i), int(k)) for i, k in enumerate(indices)])


class FinetuneTrainSet(Dataset):
    """Training pairs through :class:`MIMTrainTransform`, seeded per (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: MIMTrainTransform, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> dict[str, torch.Tensor]:
        epoch, position, index = item if isinstance(item, tuple) else (0, int(item), int(item))
        rng = np.random.default_rng([self.seed, epoch, index])
        out = self.transform(self.base[index], rng, position)
        return {"image": out["image"], "depth": out["depth"]}


def training_pairs(recipe: FinetuneRecipe) -> Dataset:
    """The raw training pairs of the recipe: ``image`` uint8 (H, W, 3), ``depth`` metres."""
    d = recipe.data
    if not d.root:
        raise ConfigError(
            "data.root is not set: the folder holding nyu_depth_v2/ (format sync) or training/ "
            "(format video)"
        )
    root = Path(d.root)
    if d.format == "video":
        from mesadepth.data.video import VideoDepthDataset

        return VideoDepthDataset(root, split=d.video_split, on_error=d.on_error, seed=d.seed)
    from mesadepth.data.nyu import NYUSyncDataset

    train_list = Path(d.train_list) if d.train_list else root / "splits" / "train_list.txt"
    if not train_list.is_file():
        raise MissingFileError(
            train_list,
            "NYUv2 train list (<rgb> <depth> per line)",
            "set data.train_list, e.g. shared/data/splits/nyudepthv2/train_list.txt",
        )
    return NYUSyncDataset(root / "nyu_depth_v2", train_list, on_error=d.on_error)


def train_loader(recipe: FinetuneRecipe, base: Dataset) -> DataLoader:
    """Shuffled, resumable, DDP-sharded batches of augmented crops (``drop_last`` like the reference)."""
    d = recipe.data
    transform = MIMTrainTransform(
        crop=d.crop_size(),
        cutdepth_every=d.cutdepth_every,
        cutdepth_p=d.cutdepth_p,
        cutdepth_mode=d.cutdepth_mode,
        max_depth=recipe.head.max_depth,
        flip_p=d.flip_p,
        colour_p=d.colour_p,
    )
    dataset = FinetuneTrainSet(base, transform, d.seed)
    n = len(dataset)
    if n < d.batch_size:
        raise ConfigError(
            f"data: {n} training pairs but data.batch_size={d.batch_size}; drop_last would "
            "leave no batch"
        )
    sampler = EpochPositionSampler(n, seed=d.seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=d.batch_size,
        sampler=sampler,
        num_workers=d.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=False,
    )


def training_mean_depth(base: Dataset, n: int) -> float:
    """Mean ground-truth depth (metres) over the valid pixels of ``n`` evenly spaced pairs."""
    total = len(base)  # type: ignore[arg-type]
    picks = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(int))
    s, c = 0.0, 0
    for k in picks:
        depth = np.asarray(base[int(k)]["depth"], dtype=np.float64)
        valid = depth > 0
        s += float(depth[valid].sum())
        c += int(valid.sum())
    if c == 0:
        raise DataError("training pairs", "no valid depth pixel in the sampled training pairs")
    return s / c


# ----------------------------------------------------------------------------- validation


def _labeled_paths(recipe: FinetuneRecipe) -> tuple[Path, Path]:
    d = recipe.data
    mat = Path(d.labeled_mat) if d.labeled_mat else Path(d.root) / "nyu_depth_v2_labeled.mat"
    splits = Path(d.splits_mat) if d.splits_mat else mat.with_name("splits.mat")
    for path, what in ((mat, "NYUv2 labeled file (MATLAB v7.3)"), (splits, "NYUv2 splits.mat")):
        if not path.is_file():
            raise MissingFileError(
                path,
                what,
                "set data.labeled_mat / data.splits_mat, or validation.enabled=false",
            )
    return mat, splits


def _test_samples(recipe: FinetuneRecipe, limit: int | None) -> list[Any]:
    from mesadepth.evaluation.evaluate import nyu_samples

    mat, splits = _labeled_paths(recipe)
    return list(islice(nyu_samples(mat, splits), limit))


def validate(
    model: DepthModel,
    samples: list[Any],
    flip: bool = True,
    shift_window: bool = True,
    constant: float | None = None,
) -> dict[str, Any]:
    """NYUv2 protocol metrics (spec 2.8) of ``model`` on ``samples`` (:class:`evaluate.Sample`).

    ``constant`` scores a constant prediction instead (the mean-depth baseline). Restores the
    model's training mode. Returns ``mean`` (the nine metrics), ``n_images``, ``n_skipped``.
    """
    from mesadepth.evaluation.evaluate import evaluate, model_predictor

    was_training = model.training
    device = str(next(model.parameters()).device)
    try:
        if constant is None:
            predictor = model_predictor(model, device=device, flip=flip, shift_window=shift_window)

            def predict(s: Any, _i: int) -> np.ndarray:
                return predictor(s.image)
        else:

            def predict(s: Any, _i: int) -> np.ndarray:
                return np.full(s.depth.shape, constant, np.float32)

        results = evaluate("nyu", iter(samples), predict, total=len(samples), progress=False)
    finally:
        model.train(was_training)
    mean = {k: results["mean"].get(k, math.nan) for k in METRIC_NAMES}
    return {**mean, "n_images": results["n_images"], "n_skipped": results["n_skipped"]}


class NYUValidation(L.Callback):
    """Validation on the labeled test split every ``every_n_epochs`` epochs (global rank 0).

    Logs ``val/<metric>`` to the trainer's loggers and appends to ``validation_history`` in
    ``RUN/metrics.json``; other ranks wait at a barrier.
    """

    def __init__(
        self,
        recipe: FinetuneRecipe,
        samples: list[Any],
        run_dir: Path,
        history: list[dict[str, Any]],
    ) -> None:
        super().__init__()
        self.cfg = recipe.validation
        self.samples = samples
        self.run_dir = run_dir
        self.history = history
        self.last: dict[str, Any] | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.cfg.every_n_epochs
        epoch = trainer.current_epoch + 1  # epochs finished
        if not every or epoch % every:
            return
        if trainer.is_global_zero:
            result = validate(
                pl_module.model,  # type: ignore[arg-type]
                self.samples,
                self.cfg.flip,
                self.cfg.shift_window,
            )
            result = {"epoch": epoch, "step": int(trainer.global_step), **result}
            self.last = result
            self.history.append(result)
            for logger in trainer.loggers:
                logger.log_metrics(
                    {f"val/{k}": result[k] for k in METRIC_NAMES}, step=trainer.global_step
                )
            write_metrics(self.run_dir, {"validation_history": self.history})
        trainer.strategy.barrier("nyu_validation")


# ----------------------------------------------------------------------------- the module


class Finetuning(L.LightningModule):
    """Encoder + Xie head trained with SILog; AdamW with layer decay on the triangle schedule."""

    def __init__(self, recipe: FinetuneRecipe) -> None:
        super().__init__()
        self.recipe = recipe
        # Plain dicts only: checkpoints stay loadable without executing pickled code.
        self.save_hyperparameters({"recipe": asdict(recipe)})
        encoder, self.init_info = build_finetune_encoder(recipe)
        # The mask token takes no part in depth prediction; frozen, it is neither decayed nor a
        # parameter without gradient that DDP would refuse.
        encoder.mask_token.requires_grad_(False)
        h = recipe.head
        self.model = DepthModel.from_encoder(
            encoder,
            num_deconv=h.num_deconv,
            num_filters=tuple(h.num_filters),
            deconv_kernels=tuple(h.deconv_kernels),
            max_depth=h.max_depth,
        )
        self.depths = list(encoder.config["depths"])
        self.first_losses: list[float] = []
        self.last_losses: list[float] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        from mesadepth.losses.silog import silog_loss

        pred = self.model(batch["image"])
        loss = silog_loss(pred, batch["depth"], lambd=self.recipe.loss.silog_lambda)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        # The schedule's value at this step (the lr of the scale-1 groups: final norm and head).
        lr = max(g["lr"] for g in self.trainer.optimizers[0].param_groups)
        self.log("train/lr", lr, on_step=True)
        value = float(loss.detach())
        if len(self.first_losses) < 10:
            self.first_losses.append(value)
        self.last_losses = (self.last_losses + [value])[-10:]
        return {"loss": loss, "terms": {"silog": loss.detach()}}

    def total_batch(self) -> int:
        t = self.trainer
        return self.recipe.data.batch_size * max(1, t.world_size) * t.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch N (``estimated_stepping_batches`` sets up the loader first)."""
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        accum = self.trainer.accumulate_grad_batches
        return max(1, math.ceil(batches / accum)) if math.isfinite(batches) else total

    def schedule(self) -> TriangleSchedule:
        o = self.recipe.optim
        n = self.steps_per_epoch()
        epochs = o.schedule_epochs or self.trainer.max_epochs
        if not epochs or epochs < 0:
            max_steps = self.trainer.max_steps
            epochs = math.ceil(max_steps / n) if max_steps and max_steps > 0 else 0
        if epochs < 2:
            raise ConfigError(
                f"the triangle schedule needs at least 2 epochs (T = N floor(E/2) > 0), got "
                f"E = {epochs}: set trainer.max_epochs or optim.schedule_epochs >= 2"
            )
        return TriangleSchedule(o.max_lr, o.min_lr, n, epochs, o.power)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.recipe.optim
        groups = param_groups_layer_decay(self.model, o.weight_decay, o.layer_decay, self.depths)
        optimizer = torch.optim.AdamW(groups, lr=o.max_lr, betas=o.betas, eps=o.eps)
        scheduler = TriangleLR(optimizer, self.schedule())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# ----------------------------------------------------------------------------- figure and run


def depth_preview_figure(
    model: DepthModel,
    samples: list[Any],
    path: Path,
    flip: bool = True,
    shift_window: bool = True,
    max_depth: float | None = None,
) -> None:
    """PNG with one row per sample: image | ground truth | prediction, one shared colour scale.

    The scale spans 0 to the largest valid ground truth or prediction shown (capped at
    ``max_depth``); pixels without ground truth are black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mesadepth.evaluation.evaluate import model_predictor

    if not samples:
        return
    was_training = model.training
    device = str(next(model.parameters()).device)
    predictor = model_predictor(model, device=device, flip=flip, shift_window=shift_window)
    preds = [predictor(s.image) for s in samples]
    model.train(was_training)
    top = max(max(float(s.depth.max()) for s in samples), max(float(p.max()) for p in preds), 1e-3)
    vmax = min(top, max_depth) if max_depth else top
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="black")
    n = len(samples)
    fig, axes = plt.subplots(n, 3, figsize=(9, 2.4 * n + 0.4), squeeze=False)
    im = None
    for r, (s, p) in enumerate(zip(samples, preds, strict=True)):
        gt = np.ma.masked_where(s.depth <= 0, s.depth)
        for c, (img, title) in enumerate(
            ((s.image, "image"), (gt, "ground truth"), (p, "prediction"))
        ):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(img)
            else:
                im = ax.imshow(img, cmap=cmap, vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(s.name, fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.91, 0.1, 0.02, 0.8))
    fig.colorbar(im, cax=cax, label="depth (m)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_finetune(
    recipe: FinetuneRecipe,
    command: list[str] | None = None,
    resume: str = "auto",
    callbacks: tuple[L.Callback, ...] = (),
) -> dict[str, Any]:
    """Fine-tune into ``recipe.run_dir``; returns the metrics written to metrics.json.

    ``resume``: ``auto`` (continue from ``RUN/checkpoints/last.ckpt`` if present), ``never``, or
    a checkpoint path. ``callbacks`` are added to the trainer (e.g. a test's simulated kill).
    """
    run_dir = Path(recipe.run_dir)
    if recipe.data.crop_size()[0] != recipe.data.crop_size()[1] and recipe.validation.enabled:
        raise ConfigError(
            f"data.crop {recipe.data.crop}: the test-time protocol uses square windows, so the "
            "encoder input must be square (or set validation.enabled=false)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(recipe, run_dir / "config.yaml", command=command)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    base = training_pairs(recipe)
    loader = train_loader(recipe, base)
    v = recipe.validation
    samples = _test_samples(recipe, v.max_images) if v.enabled else []
    module = Finetuning(recipe)
    resumed = resolve_resume(run_dir, resume) is not None
    previous = read_metrics(run_dir) if resumed else {}
    if not resumed:
        # A fresh start must not inherit a previous run's numbers (write_metrics merges).
        (run_dir / "metrics.json").unlink(missing_ok=True)
    history = list(previous.get("validation_history", []))
    validation = NYUValidation(recipe, samples, run_dir, history) if v.enabled else None
    all_callbacks = (*((validation,) if validation else ()), *callbacks)
    t0 = time.perf_counter()
    trainer = fit(module, loader, recipe.trainer, run_dir, resume=resume, callbacks=all_callbacks)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {}
    if not trainer.is_global_zero:
        return metrics
    model = module.model
    info = module.init_info
    save_depth_model(
        model,
        run_dir / "model.safetensors",
        metadata={"stage": "finetune", "init": recipe.init, "init_kind": info["kind"]},
    )
    first, last = module.first_losses, module.last_losses
    metrics = {
        "stage": "finetune",
        "init": recipe.init,
        "init_kind": info["kind"],
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "images_seen": int(trainer.global_step) * module.total_batch(),
        # A resumed run keeps the start of the curve its first part measured.
        "loss_start": previous.get("loss_start", float(np.mean(first[:3])) if first else math.nan),
        "loss_end": float(np.mean(last[-3:])) if last else previous.get("loss_end", math.nan),
        "train_seconds": round(seconds + float(previous.get("train_seconds", 0.0) or 0.0), 2),
        "train_pairs": len(base),  # type: ignore[arg-type]
    }
    if "dropped" in info:
        metrics["init_dropped"], metrics["init_reinitialised"] = (
            info["dropped"],
            info["reinitialised"],
        )
    if v.enabled:
        done = validation.last if validation is not None else None
        final = (
            done
            if done is not None and done["step"] == trainer.global_step
            else {
                "epoch": int(trainer.current_epoch),
                "step": int(trainer.global_step),
                **validate(model, samples, v.flip, v.shift_window),
            }
        )
        metrics["validation"] = {**final, "flip": v.flip, "shift_window": v.shift_window}
        if v.baseline_images > 0:
            mean_depth = training_mean_depth(base, v.baseline_images)
            baseline = validate(model, samples, constant=mean_depth)
            metrics["baseline_mean_depth"] = {"depth_m": mean_depth, **baseline}
        if recipe.figures > 0:
            depth_preview_figure(
                model,
                samples[: recipe.figures],
                run_dir / "figures" / "depth_preview.png",
                v.flip,
                v.shift_window,
                recipe.head.max_depth,
            )
    return write_metrics(run_dir, metrics)
