"""MeSa stages 2 and 3 on monocular video: SC-DepthV2 (GP) and SC-DepthV3 with pseudo-depth (SP).

Specification: geometric-and-supervised-pretraining.md sections 0 (one step), 1 (data,
transforms, loaders, validation modes, NYU), 4.10 (weights), 5 (optimisation and loop),
6 (forward passes), 7.1 (validation metrics), 9 (Swin-v2 at 480x480: design guidance) and
10 (pitfalls).

``mesadepth pretrain geometric`` (``version: v2``) and ``mesadepth pretrain supervised``
(``version: v3``) train one :class:`VideoPretraining` module: a DepthNet (the shared Swin-v2
encoder + the SC-Depth "DispNet" decoder), a ResNet PoseNet and, for v2 only, the auto-rectify
network (ARN).

Known camera poses (``pose.source: poses``, not in SC-Depth, which cannot use them): the
motion of every target/reference pair is the true one from the scene's ``poses.txt``
(camera-to-world, OpenCV axes, metres; :class:`~mesadepth.data.video.VideoSnippetDataset`'s
``motion``), in the PoseNet's convention (target -> reference, ``X_r = R X_t + t``), and the
backward pair uses its exact inverse instead of a second prediction. No PoseNet is built (no
parameters, no ``pose_net.*``), the ARN is off unless ``pose.rectify: true``, the loss terms are
unchanged, and the flip augmentation mirrors the motion with the images
(:class:`~mesadepth.data.transforms.HorizontalFlip`; scale-crop and resize change K only).
The translations are metric, so the DepthNet learns depth in metres, not up to scale
(times ``pose.translation_scale``, which can move the scene's depths near a random DepthNet's
start).
The run directory holds:

- ``config.yaml``, ``checkpoints/last.ckpt`` (resume), ``logs/`` (TensorBoard);
- ``model.safetensors``: ``encoder.*`` (the hand-off to the next stage, :func:`save_encoder`
  format) plus ``depth_decoder.*``, ``pose_net.*`` (PoseNet runs) and (with the ARN)
  ``rectify_net.*``, so SP can continue GP's decoder and PoseNet as MeSa does
  (``init=<GP run>/model.safetensors``);
- ``metrics.json``: loss start/end per term, validation of the final model, of the model before
  training and of a constant-depth baseline, what the init loaded, ``pose_source``, the torch
  thread count, and in depth mode ``abs_rel_start``, ``abs_rel_end`` and ``depth_worse`` (true
  when the stage made held-out depth worse; the run then also prints a WARNING line);
- ``figures/depth_preview.png``: validation frames, predicted depth and ground truth.

Logged scalars (spec 5) are ``train/<term>`` with this project's term names: ``photo``,
``geometry``, ``smooth``, ``rot_c``, ``rot_t``, ``rot_before``, ``rot_after`` (v2);
``photo``, ``geometry``, ``normal_matching``, ``mask_rank``, ``normal_rank`` (v3); ``total``;
and ``val_loss`` plus ``val/<metric>``.

Deliberate differences from the reference (each a recipe option where it matters):

- The training sampler draws ``batch x devices x epoch_size`` snippets with replacement per
  epoch (the reference: ``batch x epoch_size`` on one GPU), so one epoch is ``epoch_size``
  optimizer steps on any number of devices. Augmentation draws come from
  (``data.seed``, epoch, position in the epoch, snippet) instead of the reference's reseeded
  global RNGs (pitfall 20), so a resumed run repeats the same batches.
- The random draws of a step (v2's random ARN target, v3's ranking-pair samplers) come from a
  ``torch.Generator`` seeded with (``trainer.seed``, global step, rank), so they repeat after a
  resume; the reference uses the global RNG.
- Images without any valid ground-truth pixel are left out of the validation averages (the
  reference's median of an empty set gives NaN).
- The DepthNet evaluates target and references in one batch when its encoder has no BatchNorm
  (Swin-v2: same result, spec 9.8); a ResNet DepthNet is called once per image as in the
  reference (spec 6).
- ``pose.width`` < 64 narrows the PoseNet / ARN ResNets for CPU demos and tests (64 is the
  reference's ResNet; ImageNet weights only fit 64).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from mesadepth.config import save_config
from mesadepth.data.transforms import (
    SC_DEPTH_MEAN,
    SC_DEPTH_STD,
    Compose,
    HorizontalFlip,
    Normalize,
    RandomCrop,
    RandomScaleCrop,
    Resize,
    ToTensor,
    sc_depth_eval_transforms,
)
from mesadepth.data.video import (
    POSES_FILE,
    PSEUDO_DEPTH_DIR,
    VideoDepthDataset,
    VideoSnippetDataset,
    read_scene_list,
)
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.evaluation.metrics import SCALED_METRICS, median_scaled_metrics
from mesadepth.geometry import (
    euler_to_rotation,
    invert_pose,
    pair_translation_cos,
    pose_errors,
    pose_vec_to_mat,
    relative_pose,
    rotation_warp,
)
from mesadepth.losses.consistency import rot_consistency_target
from mesadepth.losses.photometric import LOSS_WEIGHTS, photo_and_geometry_loss, sc_depth_v2_losses
from mesadepth.losses.supervised import V3_LOSS_WEIGHTS, sc_depth_v3_losses
from mesadepth.models.backbone import (
    META_CONFIG,
    SWINV2_PRESETS,
    build_encoder,
    load_encoder,
    load_official_checkpoint,
    load_tensors,
    read_metadata,
    save_encoder,
    trained_window_sizes,
)
from mesadepth.models.dispnet import NUM_CH_DEC, RESNET_ENCODERS, DepthNet, build_resnet_encoder
from mesadepth.models.posenet import (
    POSE_SCALE,
    PairRegressor,
    PoseDecoder,
    PoseNet,
    load_strict,
    resnet_name,
)
from mesadepth.models.rectify import RectifyNet
from mesadepth.training import (
    ResumableRandomSampler,
    TrainerConfig,
    fit,
    read_metrics,
    resolve_resume,
    write_metrics,
)

__all__ = [
    "DecoderConfig",
    "PoseConfig",
    "PoseSnippets",
    "PositionSampler",
    "VALIDATION_METRICS",
    "VideoDataConfig",
    "VideoDataModule",
    "VideoEncoderConfig",
    "VideoLossConfig",
    "VideoOptimConfig",
    "VideoPretraining",
    "VideoRecipe",
    "VideoValidationConfig",
    "build_depth_net",
    "build_pair_net",
    "check_recipe",
    "depth_change",
    "depth_preview_figure",
    "depth_worse_warning",
    "export_model",
    "init_kind",
    "require_pseudo_depth",
    "resolve_pose_val",
    "resolve_val_mode",
    "run_video",
    "scaled_depth_errors",
    "train_transforms",
]

Version = Literal["v2", "v3"]
InitKind = Literal["random", "encoder", "stage", "official", "sc_depth"]
STAGE_NAMES: dict[str, str] = {"v2": "geometric", "v3": "supervised"}
#: Spec 7.1's metrics, in the reference's order.
VALIDATION_METRICS = SCALED_METRICS
_PSEUDO_DEPTH_HINT = (
    "stage 3 trains on a teacher's pseudo-depth: run `mesadepth pseudo-depth --teacher SPEC "
    "--data {root}` first (it writes <scene>/{folder}/*.png beside the frames), or set "
    "data.pseudo_depth to the folder name your teacher wrote"
)


# ----------------------------------------------------------------------------- the recipe


@dataclass
class VideoEncoderConfig:
    """The DepthNet encoder: a Swin-v2 (MeSa) or a ResNet (the reference, for parity runs)."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "Swin-v2 preset (tiny-cpu, swinv2_large_window12_192, ...) or resnet18/"
            "resnet50; null = the architecture stored in the init file"
        },
    )
    window_size: int | list[int] | None = field(
        default=None,
        metadata={"help": "Swin attention window, one int or one per stage; null = file/preset"},
    )
    pretrained_window_sizes: Literal["auto"] | int | list[int] = field(
        default="auto",
        metadata={
            "help": "windows the init weights were trained with (spec 9.4); auto = read from the "
            "init file (clipped to its token maps), else the preset's"
        },
    )
    embed_dim: int | None = field(default=None, metadata={"help": "null = the preset's"})
    depths: list[int] | None = field(default=None, metadata={"help": "null = the preset's"})
    num_heads: list[int] | None = field(default=None, metadata={"help": "null = the preset's"})
    drop_path_rate: float | None = field(
        default=None, metadata={"help": "stochastic depth; null = the init file's / preset's"}
    )
    layer_norm_eps: float | None = field(
        default=None,
        metadata={"help": "LayerNorm eps; null = the init file's, else 1e-5 (SimMIM's)"},
    )
    input_norm: Literal["auto", "reference", "imagenet", "unit"] = field(
        default="auto",
        metadata={
            "help": "what the encoder sees (spec 9.5): auto = ImageNet mean/std for Swin (as "
            "SimMIM pre-trained it), the SC-Depth normalisation for ResNet"
        },
    )
    pretrained: str | None = field(
        default=None,
        metadata={"help": "ResNet presets only: local ImageNet ResNet file (spec 2.1)"},
    )


@dataclass
class DecoderConfig:
    """The DispNet decoder (spec 2.2, 9.3)."""

    num_ch_dec: list[int] = field(
        default_factory=lambda: list(NUM_CH_DEC),
        metadata={"help": "widths of levels 0..4 (reference: 16, 32, 64, 128, 256)"},
    )
    skip_norm: bool | None = field(
        default=None,
        metadata={"help": "LayerNorm on the skip maps; null = on for Swin, off for ResNet"},
    )
    stem_channels: int = field(
        default=0, metadata={"help": "Swin only: stride-2 conv stem feeding level 1 (0 = none)"}
    )
    padding: Literal["reflect", "zeros"] = field(
        default="reflect",
        metadata={
            "help": "3x3 conv padding: reflect = the reference; zeros lets a Swin DepthNet (no "
            "absolute position embedding) learn where things are in the image"
        },
    )
    coarse_heads: bool = field(
        default=False,
        metadata={
            "help": "keep the three unused coarse heads (needed only to load a released SC-Depth "
            "DepthNet; they get no gradient, so DDP then needs ddp_find_unused_parameters_true)"
        },
    )


@dataclass
class PoseConfig:
    """Where the motion comes from, PoseNet and ARN (spec 2.1, 2.3, 2.4).

    ``source: poses`` (not in SC-Depth, which cannot use known poses) replaces the PoseNet by
    the true motion from each scene's ``poses.txt``; the remaining keys then describe the ARN
    only (when ``rectify`` turns it on).
    """

    source: Literal["posenet", "poses"] = field(
        default="posenet",
        metadata={
            "help": "posenet = the reference: a PoseNet predicts each pair's motion; poses = "
            "known camera poses from <scene>/poses.txt (no PoseNet is built): one line per "
            "frame of 12 numbers, the top 3x4 rows of camera-to-world, OpenCV camera axes (x "
            "right, y down, z forward), metres -- so depth is learned in metres. ScanNet "
            "pose/*.txt: take the top 3 rows; ARKit (OpenGL axes, y up, z back): right-multiply "
            "by diag(1,-1,-1,1); TUM (t q per timestamp): quaternion to matrix, nearest "
            "timestamp (mesadepth.data.video.poses_from_scannet/arkit/tum, write_poses)"
        },
    )
    translation_scale: float = field(
        default=1.0,
        metadata={
            "help": "pose.source=poses: the known translations are multiplied by this, so the "
            "DepthNet learns depth in metres x this (1 = metres; the losses are unchanged by a "
            "common scale of depth and translation, median-scaled metrics too). A random "
            "DispNet starts near 0.2 everywhere (1 / (10 x 0.5 + 0.01)); rooms several metres "
            "deep pull it far, and a short run can overshoot into its far bound (100), where "
            "the sigmoid stops the gradient (flat map). 0.1 puts indoor depths near the start"
        },
    )
    rectify: Literal["auto"] | bool = field(
        default="auto",
        metadata={
            "help": "v2's auto-rectify network (ARN): auto = on with the PoseNet (the "
            "reference), off with known poses (they already hold the rotation); true/on or "
            "false/off to choose; v3 has none"
        },
    )
    num_layers: int = field(default=18, metadata={"help": "ResNet depth (reference: 18)"})
    width: int = field(
        default=64,
        metadata={"help": "ResNet stem/stage-1 width; 64 = the reference, less for CPU demos"},
    )
    scale: float = field(
        default=POSE_SCALE,
        metadata={
            "help": "PoseNet output scale (spec 2.3: 0.01); a randomly initialised PoseNet then "
            "starts with ~3e-4 translations, which can drive the depth into its 0.1 floor "
            "before the pose learns (the ARN is not affected)"
        },
    )
    pretrained: str | None = field(
        default=None,
        metadata={
            "help": "local ImageNet ResNet file for PoseNet and ARN (torchvision resnet18-"
            "f37072fd.pth); null = random initialisation"
        },
    )


@dataclass
class VideoDataConfig:
    """SC-Depth video folders (spec 1.1-1.7)."""

    root: str = field(default="", metadata={"help": "dataset root holding training/ (+ testing/)"})
    size: list[int] = field(
        default_factory=lambda: [256, 320],
        metadata={
            "help": "training size [H, W], multiples of 32 (reference NYU 256x320; MeSa 480x480)"
        },
    )
    geometry: Literal["resize", "random_crop"] = field(
        default="resize",
        metadata={
            "help": "resize: the whole frame to size (the reference, spec 9.1); random_crop: a "
            "size crop (frames must be at least that large)"
        },
    )
    sequence_length: int = field(default=3, metadata={"help": "target + references (spec 1.2)"})
    skip_frames: int = field(default=1, metadata={"help": "reference offset k (spec 1.2)"})
    use_frame_index: bool = field(
        default=False, metadata={"help": "keep only frames listed in frame_index.txt (spec 1.3)"}
    )
    pseudo_depth: str = field(
        default=PSEUDO_DEPTH_DIR,
        metadata={"help": "v3: per-scene folder of 16-bit pseudo-depth PNGs (spec 1.4)"},
    )
    max_scale: float = field(default=1.15, metadata={"help": "random scale-crop bound (1.5)"})
    flip_cx: Literal["reference", "exact"] = field(
        default="reference",
        metadata={"help": "flip intrinsics: cx' = w - cx (reference) or w - 1 - cx (pitfall 9)"},
    )
    batch_size: int = field(default=8, metadata={"help": "snippets per device and step"})
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers per device"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling order and augmentation"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "unreadable frames: stop, or skip and count"}
    )


@dataclass
class VideoLossConfig:
    """Loss weights and the reference's ablation flags (spec 4.10, 10)."""

    weights: Literal["head", "release"] = field(
        default="head",
        metadata={
            "help": "head (the reference at HEAD) or release (v2 only: the Dec 2021 weights of "
            "the released NYU v2 model, pitfall 5)"
        },
    )
    term_weights: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "replace single weights of the preset, e.g. {normal_matching: 0, "
            "mask_rank: 0, normal_rank: 0}: v3 without its pseudo-depth terms (an ablation)"
        },
    )
    no_ssim: bool = field(default=False, metadata={"help": "photometric error without SSIM"})
    no_auto_mask: bool = field(default=False, metadata={"help": "disable the auto-mask"})
    no_dynamic_mask: bool = field(default=False, metadata={"help": "no 1 - E_d weight"})
    no_min_optimize: bool = field(default=False, metadata={"help": "no per-pixel view selection"})
    convention: Literal["reference", "exact"] = field(
        default="reference",
        metadata={
            "help": "warp sampling: reference (pitfall 1: it magnifies by W/(W-1), which L_photo "
            "undoes with a common forward translation, strongly at demo sizes) or exact pixel "
            "positions"
        },
    )
    padding_mode: Literal["zeros", "border", "reflection"] = field(
        default="zeros", metadata={"help": "grid-sample padding of the warps"}
    )
    ranking_numerics: Literal["reference", "safe"] = field(
        default="reference",
        metadata={"help": "v3 ranking loss: log(1 + exp) as the reference, or softplus"},
    )
    stable_sort: bool = field(
        default=False, metadata={"help": "v3: break ties of the unreliable set by raster order"}
    )
    ranking_depth: Literal["raw", "mean"] = field(
        default="raw",
        metadata={
            "help": "v3: what the ranking loss L_mr compares: raw = raw depth differences (the "
            "reference; the loss then pays for scaling and stretching the depth map, which no "
            "other v3 term holds back when the PoseNet reads no motion); mean = depth / its "
            "per-image mean, scale-invariant like the other v3 terms"
        },
    )


@dataclass
class VideoOptimConfig:
    """Adam, one group per network, constant lr (spec 5)."""

    lr: float = field(default=1e-4, metadata={"help": "learning rate of every network"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    eps: float = field(default=1e-8, metadata={"help": "Adam eps"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam (L2) weight decay"})
    epochs: int = field(default=100, metadata={"help": "epochs (reference: 100)"})
    epoch_size: int = field(
        default=1000, metadata={"help": "optimizer steps per epoch (reference: 1000)"}
    )


@dataclass
class VideoValidationConfig:
    """Validation after every epoch (spec 1.7, 7.1)."""

    mode: Literal["auto", "depth", "photo", "none"] = field(
        default="auto",
        metadata={
            "help": "depth: val.txt frames vs depth/*.png; photo: L_photo on val snippets; auto: "
            "depth when every val scene has depth/, else photo; none: no validation"
        },
    )
    min_depth: float = field(default=0.1, metadata={"help": "valid ground truth above (m)"})
    max_depth: float = field(default=10.0, metadata={"help": "valid ground truth below (m)"})
    crop: Literal["eigen", "none"] = field(
        default="eigen", metadata={"help": "NYU Eigen crop, scaled to the ground-truth size"}
    )
    max_photo_batches: int = field(
        default=200, metadata={"help": "photo mode: at most this many batches"}
    )
    before_training: bool = field(
        default=True,
        metadata={"help": "also validate the initial model and a constant depth (metrics.json)"},
    )
    pose: Literal["auto", "require", "never"] = field(
        default="auto",
        metadata={
            "help": "also score the PoseNet (after the ARN, v2) on val snippets against the true "
            "motion in <scene>/poses.txt (the synthetic world writes it; SC-Depth data has "
            "none): auto = when every val scene has one, require = fail without, never. Depth "
            "from video is learned through the motion: a PoseNet that learns none explains a "
            "flat depth curve. Without poses, photo mode still logs val/pose_pair_cos: the "
            "cosine between the translations predicted towards the previous and the next frame "
            "(about -1 when the PoseNet reads the motion, +1 when it predicts one translation "
            "for every pair)"
        },
    )


@dataclass
class VideoRecipe:
    """Stages 2 (v2) and 3 (v3) of MeSa. Every key can be overridden as key=value."""

    run_dir: str = field(
        default="runs/geometric",
        metadata={"help": "run directory (created; resumed if it holds checkpoints/last.ckpt)"},
    )
    version: Version = field(
        default="v2",
        metadata={"help": "v2 = SC-DepthV2 with ARN (GP); v3 = SC-DepthV3 with pseudo-depth (SP)"},
    )
    init: str = field(
        default="random",
        metadata={
            "help": "start from: an encoder.* .safetensors (masked run), a geometric/supervised "
            "run's model.safetensors (encoder + decoder + PoseNet continue), an official Swin-v2 "
            "/ SimMIM .pth, a released SC-Depth .ckpt, or random"
        },
    )
    encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    loss: VideoLossConfig = field(default_factory=VideoLossConfig)
    optim: VideoOptimConfig = field(default_factory=VideoOptimConfig)
    validation: VideoValidationConfig = field(default_factory=VideoValidationConfig)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(num_sanity_val_steps=5, log_every_n_steps=50)
    )
    figures: int = field(default=4, metadata={"help": "frames in figures/depth_preview.png"})


def check_recipe(recipe: VideoRecipe) -> None:
    """Cross-field checks that a dataclass field cannot express (ConfigError naming the key)."""
    h, w = _size(recipe)
    if h % 32 or w % 32 or h < 64 or w < 64:
        raise ConfigError(
            f"data.size={[h, w]}: height and width must be multiples of 32 and at least 64 "
            "(the DepthNet decoder needs a stride-32 map of at least 2 px)"
        )
    presets = LOSS_WEIGHTS if recipe.version == "v2" else V3_LOSS_WEIGHTS
    if recipe.loss.weights not in presets:
        raise ConfigError(
            f"loss.weights={recipe.loss.weights!r} is not a {recipe.version} preset; choose one "
            f"of {sorted(presets)}"
        )
    if not recipe.pose.scale > 0:
        raise ConfigError(f"pose.scale must be > 0 (spec 2.3: 0.01), got {recipe.pose.scale}")
    unknown = set(recipe.loss.term_weights) - set(presets[recipe.loss.weights])
    if unknown:
        raise ConfigError(
            f"loss.term_weights: no {recipe.version} term {sorted(unknown)}; the terms are "
            f"{sorted(presets[recipe.loss.weights])}"
        )
    if recipe.trainer.max_epochs is not None:
        raise ConfigError(
            "set the length with optim.epochs (and optim.epoch_size), not trainer.max_epochs; "
            "trainer.max_steps may still cut a run short"
        )
    o = recipe.optim
    if o.epochs < 1 or o.epoch_size < 1 or not o.lr > 0:
        raise ConfigError(
            f"optim: epochs and epoch_size must be >= 1 and lr > 0, got {o.epochs}, "
            f"{o.epoch_size}, {o.lr}"
        )
    if recipe.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {recipe.data.batch_size}")
    if recipe.pose.width < 1:
        raise ConfigError(f"pose.width must be >= 1, got {recipe.pose.width}")
    if not recipe.pose.translation_scale > 0:
        raise ConfigError(
            f"pose.translation_scale must be > 0 (1 = metres), got {recipe.pose.translation_scale}"
        )
    if recipe.version == "v3" and recipe.pose.rectify is True:
        raise ConfigError(
            "pose.rectify=true: SC-DepthV3 (version v3) has no auto-rectify network; use auto "
            "or false"
        )
    if not 0 < recipe.validation.min_depth < recipe.validation.max_depth:
        raise ConfigError("validation: need 0 < min_depth < max_depth")


def uses_posenet(recipe: VideoRecipe) -> bool:
    """Whether the recipe predicts motion with a PoseNet (``pose.source: posenet``)."""
    return recipe.pose.source == "posenet"


def uses_rectify(recipe: VideoRecipe) -> bool:
    """Whether the recipe builds the ARN: v2 only; ``pose.rectify`` auto = with the PoseNet."""
    if recipe.version != "v2":
        return False
    if recipe.pose.rectify == "auto":
        return uses_posenet(recipe)
    return bool(recipe.pose.rectify)


def _size(recipe: VideoRecipe) -> tuple[int, int]:
    size = recipe.data.size
    if len(size) != 2:
        raise ConfigError(f"data.size must be [height, width], got {size}")
    return int(size[0]), int(size[1])


# ----------------------------------------------------------------------------- networks


def init_kind(init: str | None) -> InitKind:
    """What ``init`` names: ``random``; ``encoder`` / ``stage`` (a ``.safetensors`` without /
    with ``depth_decoder.*``); ``official`` (a Swin-v2 / SimMIM ``.pth``); ``sc_depth`` (a
    released SC-Depth Lightning ``.ckpt``)."""
    if not init or init == "random":
        return "random"
    path = Path(init)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        return "official"
    if suffix == ".ckpt":
        return "sc_depth"
    if suffix != ".safetensors":
        raise ConfigError(
            f"init={init!r}: expected a .safetensors of an earlier stage, an official Swin-v2 / "
            "SimMIM .pth, a released SC-Depth .ckpt, or 'random'"
        )
    if not path.is_file():
        raise MissingFileError(
            path,
            "init weights",
            "the model.safetensors of an earlier stage, e.g. runs/demo/masked/model.safetensors",
        )
    return "stage" if load_tensors_keys(path, "depth_decoder.") else "encoder"


def load_tensors_keys(path: Path, prefix: str) -> list[str]:
    """Keys of a safetensors file that start with ``prefix`` (without reading the tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return [k for k in f.keys() if k.startswith(prefix)]
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(path, f"not a readable safetensors file: {err}") from err


def _file_encoder_config(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_CONFIG)
    return json.loads(raw) if raw else None


def _stages(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_stages(v) for v in value)
    return value


def build_depth_net(recipe: VideoRecipe) -> tuple[DepthNet, dict[str, Any]]:
    """The recipe's DepthNet with its encoder initialised from ``recipe.init`` (spec 9.9).

    Swin-v2 encoders are built at ``data.size`` (spec 9.1, 9.4); 192-px weights open there
    with their training windows as ``pretrained_window_sizes``. Returns the net and a record of
    the encoder's start. Decoder, PoseNet and ARN weights of a stage file are loaded by
    :class:`VideoPretraining`.
    """
    enc, dec = recipe.encoder, recipe.decoder
    kind = init_kind(recipe.init)
    path = Path(recipe.init) if kind != "random" else None
    if path is not None and not path.is_file():
        raise MissingFileError(path, "init weights", "see `init` in --help")
    net_kw = {
        "input_norm": enc.input_norm,
        "skip_norm": dec.skip_norm,
        "stem_channels": dec.stem_channels,
        "coarse_heads": dec.coarse_heads,
        "num_ch_dec": tuple(dec.num_ch_dec),
        "padding": dec.padding,
    }
    info: dict[str, Any] = {"kind": kind, "path": str(path) if path else None}
    if enc.preset in RESNET_ENCODERS:
        if kind in ("encoder", "official"):
            raise ConfigError(
                f"init={recipe.init!r} holds Swin-v2 encoder weights, but encoder.preset is "
                f"{enc.preset}; a ResNet DepthNet starts from ImageNet (encoder.pretrained), a "
                "run of the same architecture, or a released SC-Depth .ckpt"
            )
        encoder: nn.Module = build_resnet_encoder(RESNET_ENCODERS[enc.preset], enc.pretrained)
        if kind == "stage":
            state = load_tensors(path, "encoder.")
            load_strict(encoder, state, path, f"a {enc.preset} DepthNet encoder")
            info["encoder"] = "loaded"
        return DepthNet(encoder, **net_kw), info
    if enc.pretrained:
        raise ConfigError("encoder.pretrained (ImageNet ResNet) applies to resnet presets only")

    file_cfg = _file_encoder_config(path) if kind in ("encoder", "stage") else None
    if enc.preset is None and file_cfg is None:
        raise ConfigError(
            f"encoder.preset is null, which means 'the architecture of the init file', but "
            f"init={recipe.init!r} holds no encoder config: name a preset (e.g. tiny-cpu, "
            "swinv2_large_window12_192)"
        )
    overrides: dict[str, Any] = {"img_size": _size(recipe)}
    for key in ("window_size", "embed_dim", "depths", "num_heads", "drop_path_rate"):
        value = getattr(enc, key)
        if value is not None:
            overrides[key] = _stages(value)
    eps = enc.layer_norm_eps
    if eps is None:
        eps = float(file_cfg["layer_norm_eps"]) if file_cfg else 1e-5
    overrides["layer_norm_eps"] = eps
    pws: Any = enc.pretrained_window_sizes
    if pws == "auto":
        if file_cfg is not None:
            pws = trained_window_sizes(file_cfg)
        else:
            pws = SWINV2_PRESETS.get(enc.preset or "", {}).get("pretrained_window_sizes", 0)
    overrides["pretrained_window_sizes"] = _stages(pws)
    has_mask = bool(
        path and kind in ("encoder", "stage") and load_tensors_keys(path, "encoder.mask_token")
    )
    if enc.preset is None:
        swin = load_encoder(path, overrides=overrides, drop_mask_token=not has_mask)
    else:
        swin = build_encoder(enc.preset, **overrides)
        if kind in ("encoder", "stage"):
            load_encoder(path, encoder=swin, drop_mask_token=not has_mask)
        elif kind == "official":
            report = load_official_checkpoint(path, swin)
            info["dropped"], info["reinitialised"] = report.dropped, report.reinitialised
    # The mask token is SimMIM's; unused here, so it must not expect a gradient under DDP.
    swin.mask_token.requires_grad_(False)
    if kind in ("encoder", "stage", "official"):
        info["encoder"] = "loaded"
    info["pretrained_window_sizes"] = swin.config["pretrained_window_sizes"]
    return DepthNet(swin, **net_kw), info


def build_pair_net(kind: Literal["pose", "rectify"], cfg: PoseConfig) -> PairRegressor:
    """PoseNet (``"pose"``) or ARN (``"rectify"``) of ``cfg`` (spec 2.3, 2.4).

    ``cfg.width`` 64 is the reference network (ImageNet weights from ``cfg.pretrained``); a
    smaller width builds the same ResNet with stage widths (w, 2w, 4w, 8w) and a matching
    pose decoder, randomly initialised (a CPU-demo option, not in the reference). The PoseNet's
    output is scaled by ``cfg.scale`` (spec 2.3: 0.01); the ARN keeps its own (spec 2.4).
    """
    cls = PoseNet if kind == "pose" else RectifyNet
    kw = {"scale": float(cfg.scale)} if kind == "pose" else {}
    if cfg.width == 64:
        return cls(cfg.num_layers, pretrained=cfg.pretrained, **kw)
    if cfg.pretrained:
        raise ConfigError(
            f"pose.pretrained: ImageNet ResNet weights fit width 64 only, got pose.width="
            f"{cfg.width}"
        )
    net = cls(cfg.num_layers, **kw)
    w = cfg.width
    net.encoder = timm.create_model(
        resnet_name(cfg.num_layers),
        pretrained=False,
        in_chans=6,
        num_classes=0,
        global_pool="",
        zero_init_last=False,
        channels=(w, 2 * w, 4 * w, 8 * w),
        stem_width=w,
    )
    old = net.decoder
    net.decoder = PoseDecoder(net.encoder.num_features, old.num_outputs, old.scale)
    return net


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# ----------------------------------------------------------------------------- data


def require_pseudo_depth(root: str | Path, folder: str = PSEUDO_DEPTH_DIR) -> None:
    """Check that every scene of ``training/train.txt`` has ``<scene>/<folder>/*.png``.

    Raises :class:`MissingFileError` telling the user to run ``mesadepth pseudo-depth`` first.
    """
    root = Path(root)
    names = read_scene_list(root / "training" / "train.txt")
    for name in names:
        target = root / "training" / name / folder
        if not target.is_dir() or not any(target.glob("*.png")):
            raise MissingFileError(
                target,
                f"pseudo-depth PNGs for scene {name!r}",
                _PSEUDO_DEPTH_HINT.format(root=root, folder=folder),
            )


class PositionSampler(ResumableRandomSampler):
    """:class:`ResumableRandomSampler` yielding ``(epoch, position, index)``: the position in the
    epoch's global order seeds the augmentation, so a snippet drawn twice in one epoch (sampling
    with replacement, spec 1.6) is augmented twice differently, and a resumed epoch repeats."""

    def __iter__(self) -> Iterator[tuple[int, int, int]]:  # type: ignore[override]
        epoch = self.epoch
        start = self._start if self._start_epoch == epoch else 0
        world, rank = self.num_replicas, self.rank
        indices = list(super().__iter__())
        return iter((epoch, rank + world * (start + i), int(k)) for i, k in enumerate(indices))


def train_transforms(recipe: VideoRecipe) -> Compose:
    """Spec 1.5: flip, scale-crop, resize (or random crop, spec 9.1), to tensor, normalise."""
    d = recipe.data
    size = _size(recipe)
    geometric: list[Any] = [HorizontalFlip(0.5, cx_rule=d.flip_cx), RandomScaleCrop(d.max_scale)]
    geometric.append(Resize(size) if d.geometry == "resize" else RandomCrop(*size))
    return Compose([*geometric, ToTensor(), Normalize(SC_DEPTH_MEAN, SC_DEPTH_STD)])


_BATCH_KEYS = ("image", "refs", "K", "pseudo_depth", "depth", "motion", "name")


class _Snippets(Dataset):
    """Training snippets: the base dataset's raw samples, augmented with a generator of
    (seed, epoch, position, index); items are ``(epoch, position, index)`` or a plain index."""

    def __init__(self, base: VideoSnippetDataset, transform: Compose, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: Any) -> dict[str, Any]:
        epoch, pos, k = item if isinstance(item, tuple) else (0, int(item), int(item))
        sample = self.base[k]
        out = self.transform(sample, np.random.default_rng([self.seed, epoch, pos, k]))
        return {key: out[key] for key in _BATCH_KEYS if key in out}


class _Batchable(Dataset):
    """Keeps only the keys a batch needs (strings such as ``scene`` would collate fine, but
    the integer lists of snippet samples would become tensors for nothing)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, k: int) -> dict[str, Any]:
        out = self.base[k]
        return {key: out[key] for key in _BATCH_KEYS if key in out}


def resolve_val_mode(recipe: VideoRecipe) -> Literal["depth", "photo", "none"]:
    """Spec 1.7: ``depth`` where every val scene has ground truth, ``photo`` otherwise;
    ``none`` when asked or when there is no ``training/val.txt``."""
    mode = recipe.validation.mode
    if mode == "none":
        return "none"
    val_list = Path(recipe.data.root) / "training" / "val.txt"
    if not val_list.is_file():
        if mode == "auto":
            return "none"
        raise MissingFileError(val_list, f"validation scene list (validation.mode={mode})")
    if mode != "auto":
        return mode
    scenes = read_scene_list(val_list)
    has_depth = all((val_list.parent / s / "depth").is_dir() for s in scenes)
    return "depth" if has_depth else "photo"


def resolve_pose_val(recipe: VideoRecipe) -> bool:
    """Whether validation also scores the PoseNet (``validation.pose``) against poses.txt
    (never with ``pose.source: poses``: there is no PoseNet)."""
    want = recipe.validation.pose
    if want == "never" or not uses_posenet(recipe) or resolve_val_mode(recipe) == "none":
        return False
    val_list = Path(recipe.data.root) / "training" / "val.txt"
    missing = [
        s for s in read_scene_list(val_list) if not (val_list.parent / s / POSES_FILE).is_file()
    ]
    if missing and want == "require":
        raise MissingFileError(
            val_list.parent / missing[0] / POSES_FILE,
            "true camera motion for validation.pose=require (12 numbers per frame: top 3x4 of "
            "camera-to-world); set validation.pose=auto or never for data without it",
        )
    return not missing


class PoseSnippets(Dataset):
    """Validation snippets plus ``gt_pose`` (R, 4, 4) float32: the true target -> reference
    motion of each reference (:func:`~mesadepth.geometry.relative_pose` of poses.txt), the
    motion PoseNet(I_t, I_r) predicts (spec 3.3)."""

    def __init__(self, base: VideoSnippetDataset) -> None:
        self.base = base
        self._poses: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, k: int) -> dict[str, Any]:
        out = self.base[k]
        s, target, refs = self.base.samples[k]
        if s not in self._poses:
            self._poses[s] = torch.from_numpy(self.base.scenes[s].poses())
        cam = self._poses[s]
        gt = torch.stack([relative_pose(cam[target], cam[r]) for r in refs]).float()
        return {**{key: out[key] for key in _BATCH_KEYS if key in out}, "gt_pose": gt}


class VideoDataModule(L.LightningDataModule):
    """Training snippets (spec 1.2-1.6) and the validation set of spec 1.7.

    The datasets are opened in the constructor, so a bad folder fails before any model is
    built. The training loader is built when the trainer knows its world size: each epoch
    draws ``batch_size x world x epoch_size`` snippets with replacement, so every device runs
    ``epoch_size`` batches.
    """

    def __init__(self, recipe: VideoRecipe) -> None:
        super().__init__()
        self.recipe = recipe
        d = recipe.data
        if not d.root:
            raise ConfigError("data.root is not set: give the video root holding training/")
        if not (Path(d.root) / "training").is_dir():
            raise MissingFileError(
                Path(d.root) / "training",
                "SC-Depth training folder (train.txt, val.txt, <scene>/*.jpg, cam.txt)",
            )
        self.base = VideoSnippetDataset(
            d.root,
            "train",
            sequence_length=d.sequence_length,
            skip_frames=d.skip_frames,
            use_frame_index=d.use_frame_index,
            pseudo_depth=d.pseudo_depth if recipe.version == "v3" else None,
            on_error=d.on_error,
            seed=d.seed,
            poses=not uses_posenet(recipe),
        )
        self.train_set = _Snippets(self.base, train_transforms(recipe), d.seed)
        self.val_mode = resolve_val_mode(recipe)
        self.val_set = self._val_set()
        self.pose_set: Dataset | None = None
        if self.val_set is not None and resolve_pose_val(recipe):
            self.pose_set = PoseSnippets(
                VideoSnippetDataset(
                    d.root,
                    "val",
                    sequence_length=d.sequence_length,
                    skip_frames=d.skip_frames,
                    transform=sc_depth_eval_transforms(_size(recipe), full_resolution=()),
                    on_error=d.on_error,
                )
            )

    def _val_set(self) -> Dataset | None:
        d, size = self.recipe.data, _size(self.recipe)
        if self.val_mode == "depth":
            return _Batchable(
                VideoDepthDataset(
                    d.root, "val", transform=sc_depth_eval_transforms(size), on_error=d.on_error
                )
            )
        if self.val_mode == "photo":
            snippets = VideoSnippetDataset(
                d.root,
                "val",
                sequence_length=d.sequence_length,
                skip_frames=d.skip_frames,
                transform=sc_depth_eval_transforms(size, full_resolution=()),
                on_error=d.on_error,
                poses=not uses_posenet(self.recipe),
            )
            n = min(len(snippets), self.recipe.validation.max_photo_batches * d.batch_size)
            return _Batchable(Subset(snippets, range(n)))
        return None

    def sampler(self, world: int) -> PositionSampler:
        d = self.recipe.data
        return PositionSampler(
            len(self.train_set),
            seed=d.seed,
            num_samples=d.batch_size * world * self.recipe.optim.epoch_size,
            replacement=True,
        )

    def train_dataloader(self) -> DataLoader:
        d = self.recipe.data
        world = max(1, self.trainer.world_size) if self.trainer is not None else 1
        return DataLoader(
            self.train_set,
            batch_size=d.batch_size,
            sampler=self.sampler(world),
            num_workers=d.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The depth (or photo) loader, then the pose loader when poses are scored."""
        sets = [s for s in (self.val_set, self.pose_set) if s is not None]
        loaders = [
            DataLoader(
                s,
                batch_size=self.recipe.data.batch_size,
                shuffle=False,
                num_workers=self.recipe.data.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            for s in sets
        ]
        return loaders[0] if len(loaders) == 1 else loaders


# ----------------------------------------------------------------------------- validation metrics


def scaled_depth_errors(
    pred: Tensor,
    gt: Tensor,
    *,
    min_depth: float = 0.1,
    max_depth: float = 10.0,
    crop: str | None = "eigen",
) -> tuple[dict[str, float], int]:
    """Spec 7.1 on one batch: per image, median scaling then the nine metrics; batch means.

    ``pred`` (B, 1, h, w) is resized to the ground truth's size (bilinear, align_corners
    False), then each image is scored by :func:`~mesadepth.evaluation.metrics.
    median_scaled_metrics` (valid range and crop, lower-median scaling, clamping).

    Args:
        pred: (B, 1, h, w) predicted depth (any positive scale).
        gt: (B, 1, H, W) ground truth in metres (0 = missing).

    Returns:
        (means over the images with at least one valid pixel, number of such images).
    """
    if pred.dim() != 4 or gt.dim() != 4 or pred.shape[0] != gt.shape[0]:
        raise ValueError(
            f"scaled_depth_errors: expected (B, 1, h, w) and (B, 1, H, W), got "
            f"{tuple(pred.shape)}, {tuple(gt.shape)}"
        )
    pred = pred.detach().float()
    if pred.shape[-2:] != gt.shape[-2:]:
        pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    sums = dict.fromkeys(VALIDATION_METRICS, 0.0)
    counted = 0
    for p, g in zip(pred[:, 0].cpu(), gt[:, 0].detach().float().cpu(), strict=True):
        values = median_scaled_metrics(p.numpy(), g.numpy(), min_depth, max_depth, crop)
        if values is None:
            continue
        for k in sums:
            sums[k] += values[k]
        counted += 1
    if not counted:
        return dict.fromkeys(VALIDATION_METRICS, math.nan), 0
    return {k: v / counted for k, v in sums.items()}, counted


# ----------------------------------------------------------------------------- the module


def _step_seed(seed: int, step: int, rank: int, purpose: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class VideoPretraining(L.LightningModule):
    """SC-DepthV2 (``version: v2``) or SC-DepthV3 (``v3``) as one LightningModule (spec 0).

    Attributes ``depth_net``, ``pose_net`` and (v2) ``rectify_net`` carry the reference's
    state-dict prefixes (spec 8). ``training_step`` returns the weighted total and every named
    term (the NaN guard names the culprit); ``validation_step`` follows spec 1.7 / 7.1.
    """

    def __init__(self, recipe: VideoRecipe) -> None:
        super().__init__()
        check_recipe(recipe)
        self.recipe = recipe
        # Plain dicts only: checkpoints stay loadable without executing pickled code.
        self.save_hyperparameters({"recipe": asdict(recipe)})
        self.version: Version = recipe.version
        self.depth_net, self.init_info = build_depth_net(recipe)
        # Known poses (pose.source: poses) replace the PoseNet: no parameters, nothing exported.
        self.pose_net = build_pair_net("pose", recipe.pose) if uses_posenet(recipe) else None
        self.rectify_net = build_pair_net("rectify", recipe.pose) if uses_rectify(recipe) else None
        if self.init_info["kind"] == "stage":
            self._continue_stage(Path(recipe.init))
        elif self.init_info["kind"] == "sc_depth":
            self._load_sc_depth(Path(recipe.init))
        self._depth_batched = not _has_batchnorm(self.depth_net)
        self.val_mode: str = resolve_val_mode(recipe) if recipe.data.root else "none"
        self.first_losses: list[dict[str, float]] = []
        self.last_losses: list[dict[str, float]] = []
        self._val_rows: list[tuple[dict[str, float], int]] = []
        self._pose_rows: list[tuple[dict[str, float], int]] = []
        self.last_validation: dict[str, Any] | None = None
        self._start_step: int | None = None

    # -- initialisation from earlier runs --------------------------------------------------------

    def _continue_stage(self, path: Path) -> None:
        """A geometric/supervised run's model.safetensors: decoder, PoseNet, ARN continue."""
        loaded, ignored = ["encoder"], []
        # Padding has no weights, so a mismatch would load silently and change every output.
        meta = read_metadata(path)
        written = (meta.get("depth_net") or {}).get("decoder") or {}
        padding = written.get("padding", "reflect")
        if padding != self.depth_net.decoder.padding:
            raise ConfigError(
                f"{path}: its DispNet decoder was trained with decoder.padding={padding}, this "
                f"recipe has decoder.padding={self.depth_net.decoder.padding}; set it like "
                "that run"
            )
        pose_scale = (meta.get("pose") or {}).get("scale", POSE_SCALE)
        has_pose = bool(load_tensors_keys(path, "pose_net."))
        if (
            has_pose
            and self.pose_net is not None
            and not math.isclose(pose_scale, self.recipe.pose.scale)
        ):
            raise ConfigError(
                f"{path}: its PoseNet was trained with pose.scale={pose_scale}, this recipe has "
                f"pose.scale={self.recipe.pose.scale}; set it like that run"
            )
        decoder = load_tensors(path, "depth_decoder.")
        load_strict(
            self.depth_net.decoder,
            decoder,
            path,
            "this DispNet decoder (set decoder.* like the run that wrote the file)",
        )
        loaded.append("depth_decoder")
        if has_pose and self.pose_net is not None:
            pose = load_tensors(path, "pose_net.")
            load_strict(self.pose_net, pose, path, "this PoseNet (set pose.* like that run)")
            loaded.append("pose_net")
        elif has_pose:
            ignored.append("pose_net")  # pose.source: poses needs none
        rect = load_tensors(path, "rectify_net.")
        if rect and self.rectify_net is not None:
            load_strict(self.rectify_net, rect, path, "this ARN (set pose.* like that run)")
            loaded.append("rectify_net")
        elif rect:
            ignored.append("rectify_net")  # v3 has no ARN (the reference's non-strict load)
        self.init_info.update(loaded=loaded, ignored=ignored)

    def _load_sc_depth(self, path: Path) -> None:
        """A released SC-Depth .ckpt (spec 8): every network of the file this recipe builds.

        Each loads strictly; one that does not fit this recipe's network is a DataError naming
        the file, the keys and the settings that match the release (the user asked for these
        weights, so a random network would be a silent substitute). A network the recipe does
        not build (the ARN of a v2 file in a v3 run) is dropped, as the reference's non-strict
        load does, and recorded in ``ignored``; networks the file lacks stay random (``random``).
        """
        from mesadepth.models.sc_depth import read_sc_depth_checkpoint

        nets, report = read_sc_depth_checkpoint(path)
        loaded, ignored = [], []
        targets = {
            "depth_net": self.depth_net,
            "pose_net": self.pose_net,
            "rectify_net": self.rectify_net,
        }
        for name, state in nets.items():
            target = targets.get(name)
            if target is None:
                ignored.append(name)
                continue
            n = report.resnet_layers[name]
            if name == "depth_net":
                what = (
                    f"this recipe's DepthNet (init={path.name} holds a ResNet-{n} DepthNet with "
                    f"four disparity heads: set encoder.preset=resnet{n} decoder.coarse_heads=true; "
                    "a Swin-v2 DepthNet cannot take it)"
                )
            else:
                what = (
                    f"this recipe's {'PoseNet' if name == 'pose_net' else 'ARN'} (init="
                    f"{path.name} holds a ResNet-{n} one: set pose.num_layers={n} pose.width=64)"
                )
            load_strict(target, state, path, what)
            loaded.append(name)
        random = [k for k, t in targets.items() if t is not None and k not in nets]
        self.init_info.update(
            loaded=loaded, ignored=ignored, random=random, model_version=report.model_version
        )

    # -- forward helpers -------------------------------------------------------------------------

    def depths(self, images: Sequence[Tensor]) -> list[Tensor]:
        """DepthNet on each image batch; one concatenated call when the net has no BatchNorm."""
        if self._depth_batched and len(images) > 1:
            return list(self.depth_net(torch.cat(list(images), 0)).chunk(len(images), 0))
        return [self.depth_net(x) for x in images]

    def forward(self, image: Tensor) -> Tensor:
        """Depth (B, 1, H, W) of normalised images (B, 3, H, W)."""
        return self.depth_net(image)

    def _generator(self, device: torch.device, purpose: str) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(
            _step_seed(self.recipe.trainer.seed, self.global_step, self.global_rank, purpose)
        )
        return g

    def _loss_options(self) -> dict[str, Any]:
        lo = self.recipe.loss
        return {
            "no_ssim": lo.no_ssim,
            "no_auto_mask": lo.no_auto_mask,
            "no_dynamic_mask": lo.no_dynamic_mask,
            "no_min_optimize": lo.no_min_optimize,
            "convention": lo.convention,
            "padding_mode": lo.padding_mode,
        }

    def loss_weights(self) -> dict[str, float]:
        """The preset ``loss.weights`` of this version with ``loss.term_weights`` applied."""
        lo = self.recipe.loss
        presets = LOSS_WEIGHTS if self.version == "v2" else V3_LOSS_WEIGHTS
        return {**presets[lo.weights], **{k: float(v) for k, v in lo.term_weights.items()}}

    def rectify(self, tgt: Tensor, ref: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
        """v2: ``(RotWarp(I_r, r1), r1)`` with ``r1 = ARN(I_t, I_r)`` (spec 2.4, 3.5)."""
        assert self.rectify_net is not None
        r1 = self.rectify_net(tgt, ref)
        return rotation_warp(ref, r1, K, convention=self.recipe.loss.convention), r1

    def motions(
        self,
        tgt: Tensor,
        refs: Sequence[Tensor],
        motion: Tensor | None,
        turns: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The target -> reference motions T_j and their backward partners T_j^inv (spec 3.4).

        PoseNet: ``PoseNet(I_t, I_rj)`` and ``PoseNet(I_rj, I_t)`` (B, 6), as the reference.
        Known poses (``motion`` (B, R, 4, 4) from the batch, metres): ``T_j`` with its
        translation times ``pose.translation_scale``, and its exact inverse; references
        rectified by the ARN (``turns`` = R(r1_j)) show camera r_j turned by R(r1_j)
        (``X_r = R(r1) X_rect``), so their motion is ``R(r1)^T T_j``.
        """
        if self.pose_net is not None:
            return [self.pose_net(tgt, r) for r in refs], [self.pose_net(r, tgt) for r in refs]
        if motion is None:
            raise ConfigError(
                "pose.source=poses needs the true motion in the batch ('motion': the dataset "
                "reads it from poses.txt)"
            )
        if motion.shape[1] != len(refs):
            raise ConfigError(f"motion holds {motion.shape[1]} poses for {len(refs)} references")
        scale = float(self.recipe.pose.translation_scale)
        if scale != 1.0:
            motion = motion.clone()
            motion[..., :3, 3] *= scale
        fwd = [motion[:, j].to(tgt.dtype) for j in range(len(refs))]
        if turns is not None:
            fwd = [
                torch.cat([turn.transpose(-1, -2) @ m[:, :3], m[:, 3:]], 1)
                for turn, m in zip(turns, fwd, strict=True)
            ]
        return fwd, [invert_pose(m) for m in fwd]

    def v2_terms(
        self, tgt: Tensor, refs: Sequence[Tensor], K: Tensor, motion: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Spec 0 v2 / 4.5: rectify each reference with the ARN, then the SC-DepthV2 losses.

        Without the ARN (``pose.rectify``) the references stay raw and the ARN terms are
        absent: photometric, geometry and smoothness only (SC-DepthV1's set).
        """
        if self.rectify_net is None:
            depths = self.depths([tgt, *refs])
            poses, poses_inv = self.motions(tgt, refs, motion)
            return sc_depth_v2_losses(
                tgt,
                refs,
                depths[0],
                depths[1:],
                K,
                poses,
                poses_inv,
                weights=self.loss_weights(),
                **self._loss_options(),
            )
        conv = self.recipe.loss.convention
        gen = self._generator(tgt.device, "rot_target")
        tgt_depth = self.depths([tgt])[0]
        rect, r1s, r2s, r3s, gs = [], [], [], [], []
        for ref in refs:
            ref_w, r1 = self.rectify(tgt, ref, K)  # not detached (spec 4.5)
            r2 = self.rectify_net(tgt, ref_w)
            g, q = rot_consistency_target(r1, ref_w, ref, K, generator=gen, convention=conv)
            r3 = self.rectify_net(q, ref)
            rect.append(ref_w)
            r1s.append(r1)
            r2s.append(r2)
            r3s.append(r3)
            gs.append(g)
        ref_depths = self.depths(rect)
        turns = None if self.pose_net is not None else [euler_to_rotation(r) for r in r1s]
        poses, poses_inv = self.motions(tgt, rect, motion, turns)
        return sc_depth_v2_losses(
            tgt,
            rect,
            tgt_depth,
            ref_depths,
            K,
            poses,
            poses_inv,
            rot1=r1s,
            rot2=r2s,
            rot3=r3s,
            rot_target=gs,
            weights=self.loss_weights(),
            **self._loss_options(),
        )

    def v3_terms(
        self,
        tgt: Tensor,
        refs: Sequence[Tensor],
        K: Tensor,
        pseudo_depth: Tensor,
        motion: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Spec 0 v3: raw references (no ARN), SC-DepthV3 losses with the pseudo-depth."""
        depths = self.depths([tgt, *refs])
        poses, poses_inv = self.motions(tgt, refs, motion)
        # A CPU generator draws the same ranking pairs on CPU and GPU (losses/supervised.py).
        gen = self._generator(torch.device("cpu"), "ranking")
        lo = self.recipe.loss
        return sc_depth_v3_losses(
            tgt,
            refs,
            depths[0],
            depths[1:],
            K,
            poses,
            poses_inv,
            pseudo_depth,
            generator=gen,
            weights=self.loss_weights(),
            ranking_numerics=lo.ranking_numerics,
            stable_sort=lo.stable_sort,
            ranking_depth=lo.ranking_depth,
            **self._loss_options(),
        )

    def step_terms(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """All loss terms of one training batch (``total`` included)."""
        tgt, refs, K = batch["image"], list(batch["refs"]), batch["K"]
        motion = batch.get("motion")
        if self.version == "v2":
            return self.v2_terms(tgt, refs, K, motion)
        if "pseudo_depth" not in batch:
            raise ConfigError("version v3 needs pseudo-depth in the batch (data.pseudo_depth)")
        return self.v3_terms(tgt, refs, K, batch["pseudo_depth"], motion)

    # -- training --------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        terms = self.step_terms(batch)
        total = terms["total"]
        detached = {k: v.detach() for k, v in terms.items()}
        for name, value in detached.items():
            self.log(
                f"train/{name}",
                value.float(),
                on_step=True,
                on_epoch=False,
                prog_bar=name in ("total", "photo"),
                batch_size=batch["image"].shape[0],
            )
        names = list(detached)
        values = torch.stack([detached[k].float() for k in names]).tolist()
        row = dict(zip(names, values, strict=True))
        if len(self.first_losses) < 10:
            self.first_losses.append(row)
            if len(self.first_losses) == 3 and self._start_step == 0:
                # Written now, so a run killed later still reports where its curve began.
                write_metrics(self.recipe.run_dir, {"loss_start": _mean_rows(self.first_losses)})
        self.last_losses = (self.last_losses + [row])[-10:]
        return {"loss": total, "terms": {k: v for k, v in detached.items() if k != "total"}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.recipe.optim
        groups = []
        for name in ("depth_net", "pose_net", "rectify_net"):
            net = getattr(self, name)
            if net is None:
                continue
            params = [p for p in net.parameters() if p.requires_grad]
            groups.append({"params": params, "name": name})
        return torch.optim.Adam(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )

    def on_train_start(self) -> None:
        self._start_step = int(self.global_step)
        v = self.recipe.validation
        if self._start_step or not v.before_training or self.val_mode == "none":
            return
        if self.global_rank != 0:
            return
        dm = self.trainer.datamodule
        if dm is None or dm.val_set is None:
            return
        bs = self.recipe.data.batch_size
        loader = DataLoader(dm.val_set, batch_size=bs, shuffle=False)
        poses = None if dm.pose_set is None else DataLoader(dm.pose_set, batch_size=bs)
        # Forked RNG: the extra pass must not change the random stream of training.
        with torch.random.fork_rng(devices=[]):
            start, baseline = self.validation_pass(loader, baseline=True, pose_loader=poses)
        out: dict[str, Any] = {"validation_start": start}
        if baseline is not None:
            out["baseline_constant_depth"] = baseline
        write_metrics(self.recipe.run_dir, out)

    # -- validation ------------------------------------------------------------------------------

    def val_batch(
        self, batch: Mapping[str, Any], baseline: bool = False
    ) -> tuple[dict[str, float], int, dict[str, float] | None]:
        """Metrics of one validation batch (spec 1.7): (values, images counted, baseline).

        Photo mode adds ``pose_pair_cos`` (not in the reference): the PoseNet's translations
        towards the first and the last reference, compared by
        :func:`~mesadepth.geometry.pair_translation_cos`; no ground truth needed.
        """
        v = self.recipe.validation
        crop = None if v.crop == "none" else v.crop
        if self.val_mode == "depth":
            image, gt = batch["image"], batch["depth"]
            pred = self.depth_net(image)
            values, n = scaled_depth_errors(
                pred, gt, min_depth=v.min_depth, max_depth=v.max_depth, crop=crop
            )
            values["val_loss"] = values["abs_rel"]
            base = None
            if baseline:
                base, _ = scaled_depth_errors(
                    torch.ones_like(pred),
                    gt,
                    min_depth=v.min_depth,
                    max_depth=v.max_depth,
                    crop=crop,
                )
            return values, n, base
        tgt, refs, K = batch["image"], list(batch["refs"]), batch["K"]
        turns = None
        if self.rectify_net is not None:
            # v2 photo-mode validation: references rectified with r1 only (spec 1.7).
            rectified = [self.rectify(tgt, r, K) for r in refs]
            refs = [r for r, _ in rectified]
            if self.pose_net is None:
                turns = [euler_to_rotation(r1) for _, r1 in rectified]
        depths = self.depths([tgt, *refs])
        poses, poses_inv = self.motions(tgt, refs, batch.get("motion"), turns)
        pg = photo_and_geometry_loss(
            tgt, refs, depths[0], depths[1:], K, poses, poses_inv, **self._loss_options()
        )
        values = {"val_loss": float(pg.photo), "photo": float(pg.photo)}
        if len(poses) > 1 and self.pose_net is not None:
            pair = pair_translation_cos(poses[0][:, :3].float(), poses[-1][:, :3].float())
            values["pose_pair_cos"] = float(pair.nanmean())
        return values, tgt.shape[0], None

    def pose_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, float], int]:
        """PoseNet errors on one batch of :class:`PoseSnippets` (``validation.pose``).

        v2 scores the motion the system predicts: PoseNet(I_t, RotWarp(I_r, r1)) composed with
        the ARN's rotation, since RotWarp(I_r, r1) shows camera r turned by R(r1)
        (``X_r = R(r1) X_rectified``). Values: ``pose_rot_err_deg``, ``pose_rot_none_deg``
        (the error of predicting no rotation), ``pose_t_cos`` (see
        :func:`~mesadepth.geometry.pose_errors`), means over pairs; ``pose_pair_cos`` (see
        :func:`~mesadepth.geometry.pair_translation_cos`), the mean over snippets.
        """
        if self.pose_net is None:
            raise ConfigError("pose validation scores a PoseNet; pose.source=poses has none")
        tgt, K, gt = batch["image"], batch["K"], batch["gt_pose"]
        errs, motions = [], []
        for j, ref in enumerate(batch["refs"]):
            turn = None
            if self.rectify_net is not None:
                ref, r1 = self.rectify(tgt, ref, K)
                turn = euler_to_rotation(r1)
            motion = pose_vec_to_mat(self.pose_net(tgt, ref))
            if turn is not None:
                motion = torch.cat([turn @ motion[:, :3], motion[:, 3:]], 1)
            motions.append(motion.float())
            errs.append(pose_errors(motions[-1], gt[:, j].float()))
        rot = torch.cat([e["rot_err_deg"] for e in errs])
        none = torch.cat([e["rot_gt_deg"] for e in errs])
        cos = torch.cat([e["t_cos"] for e in errs])
        values = {
            "pose_rot_err_deg": float(rot.mean()),
            "pose_rot_none_deg": float(none.mean()),
            "pose_t_cos": float(cos.nanmean()),
        }
        if len(motions) > 1:
            pair = pair_translation_cos(motions[0][:, :3, 3], motions[-1][:, :3, 3])
            values["pose_pair_cos"] = float(pair.nanmean())
        return values, int(rot.numel())

    @torch.no_grad()
    def validation_pass(
        self, loader: DataLoader, baseline: bool = False, pose_loader: DataLoader | None = None
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        """Validate over ``loader`` (and score poses over ``pose_loader``) outside Lightning's
        loop, in eval mode (restored after)."""
        was_training = self.training
        self.eval()
        rows, base_rows, pose_rows = [], [], []
        try:
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                values, n, base = self.val_batch(batch, baseline)
                rows.append((values, n))
                if base is not None:
                    base_rows.append((base, n))
            for batch in pose_loader or ():
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                pose_rows.append(self.pose_batch(batch))
        finally:
            self.train(was_training)
        out = {**_mean_batches(rows), **_mean_batches(pose_rows)}
        return out, (_mean_batches(base_rows) if base_rows else None)

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if dataloader_idx == 1:
            self._pose_rows.append(self.pose_batch(batch))
            return
        values, n, _ = self.val_batch(batch)
        self._val_rows.append((values, n))

    def on_validation_epoch_start(self) -> None:
        self._val_rows, self._pose_rows = [], []

    def on_validation_epoch_end(self) -> None:
        local = {**_mean_batches(self._val_rows), **_mean_batches(self._pose_rows)}
        self._val_rows, self._pose_rows = [], []
        if not local:
            return
        keys = sorted(local)
        t = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="mean")
        synced = dict(zip(keys, t.tolist(), strict=True))
        for k, value in synced.items():
            name = "val_loss" if k == "val_loss" else f"val/{k}"
            self.log(name, value, prog_bar=k == "val_loss", sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_validation = {**synced, "step": int(self.global_step)}


def _mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else ()
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _mean_batches(rows: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Unweighted mean over batches (spec 7.1), of the batches with a counted image."""
    kept = [r for r, n in rows if n > 0]
    return _mean_rows(kept) if kept else {}


# ----------------------------------------------------------------------------- figures and export


def depth_preview_figure(
    module: VideoPretraining, dataset: Dataset, path: Path, n: int = 4
) -> None:
    """PNG of n frames spread over ``dataset``: the frame, the predicted depth and, when present,
    the ground truth.

    With ground truth the prediction is median-scaled to it (spec 7.1) and both share one
    colour range; without, each prediction uses its own range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = len(dataset)  # type: ignore[arg-type]
    # Spread over the set: consecutive video frames would show the same view n times.
    picks = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int)) if total else []
    items = [dataset[int(i)] for i in picks]
    if not items:
        return
    x = torch.stack([it["image"] for it in items]).to(module.device)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        pred = module.depth_net(x).float()
    module.train(was_training)
    has_gt = "depth" in items[0]
    cols = 3 if has_gt else 2
    fig, axes = plt.subplots(len(items), cols, figsize=(3 * cols, 2.4 * len(items)), squeeze=False)
    mean = torch.tensor(SC_DEPTH_MEAN).view(3, 1, 1)
    std = torch.tensor(SC_DEPTH_STD).view(3, 1, 1)
    for r, it in enumerate(items):
        rgb = (it["image"].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        p = pred[r, 0].cpu()
        vmin = vmax = None
        if has_gt:
            g = it["depth"][0].float()
            if p.shape != g.shape:
                p = F.interpolate(p[None, None], size=g.shape, mode="bilinear")[0, 0]
            valid = g > 0
            if bool(valid.any()):
                p = p * (torch.median(g[valid]) / torch.median(p[valid]))
                vmin, vmax = float(g[valid].min()), float(g[valid].max())
        panels = [(rgb, "frame", None)]
        panels.append((p.numpy(), "predicted depth" + (" (median-scaled)" if has_gt else ""), 1))
        if has_gt:
            panels.append((it["depth"][0].numpy(), "ground truth (m)", 1))
        for c, (img, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            if cmap is None:
                ax.imshow(img)
            else:
                im = ax.imshow(img, cmap="magma_r", vmin=vmin, vmax=vmax)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.axis("off")
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_model(module: VideoPretraining, path: Path) -> Path:
    """``model.safetensors``: ``encoder.*`` + ``depth_decoder.*``, ``pose_net.*`` (+ ``rectify_net.*``)."""
    extra: dict[str, Tensor] = {}
    for prefix, net in (
        ("depth_decoder.", module.depth_net.decoder),
        ("pose_net.", module.pose_net),
        ("rectify_net.", module.rectify_net),
    ):
        if net is not None:
            extra.update({prefix + k: v for k, v in net.state_dict().items()})
    r = module.recipe
    meta = {
        "stage": STAGE_NAMES[r.version],
        "version": r.version,
        "depth_net": module.depth_net.config,
        "pose": asdict(r.pose),
        "pose_source": r.pose.source,
        "size": list(_size(r)),
    }
    return save_encoder(module.depth_net.encoder, path, extra=extra, metadata=meta)  # type: ignore[arg-type]


def run_video(
    recipe: VideoRecipe,
    command: list[str] | None = None,
    resume: str = "auto",
    callbacks: tuple[L.Callback, ...] = (),
) -> dict[str, Any]:
    """Train stage 2 (v2) or 3 (v3) into ``recipe.run_dir``; returns the metrics written.

    ``callbacks`` are added to the trainer (progress reporting, or a test's simulated kill).
    """
    check_recipe(recipe)
    run_dir = Path(recipe.run_dir)
    if recipe.version == "v3" and recipe.data.root:
        require_pseudo_depth(recipe.data.root, recipe.data.pseudo_depth)
    datamodule = VideoDataModule(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = resolve_resume(run_dir, resume) is not None
    if not resumed:
        # A fresh run must not inherit an abandoned run's numbers (write_metrics merges).
        (run_dir / "metrics.json").unlink(missing_ok=True)
    save_config(recipe, run_dir / "config.yaml", command=command)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    module = VideoPretraining(recipe)
    trainer_cfg = dataclasses.replace(recipe.trainer, max_epochs=recipe.optim.epochs)
    if datamodule.val_set is None:
        trainer_cfg = dataclasses.replace(trainer_cfg, limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer = fit(module, datamodule, trainer_cfg, run_dir, resume=resume, callbacks=callbacks)
    seconds = time.perf_counter() - t0
    last = module.last_validation
    if datamodule.val_set is not None and (last is None or last["step"] != trainer.global_step):
        # The run ended between validations (max_steps): validate the weights it exports.
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        export_model(module, run_dir / "model.safetensors")
        preview = datamodule.val_set if datamodule.val_set is not None else datamodule.train_set
        with contextlib.suppress(DataError):
            depth_preview_figure(
                module, preview, run_dir / "figures" / "depth_preview.png", recipe.figures
            )
        previous = read_metrics(run_dir)
        first, last_rows = module.first_losses, module.last_losses
        metrics = {
            "stage": STAGE_NAMES[recipe.version],
            "version": recipe.version,
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "images_seen": int(trainer.global_step)
            * recipe.data.batch_size
            * max(1, trainer.world_size),
            "loss_start": previous.get("loss_start") or (_mean_rows(first[:3]) if first else {}),
            "loss_end": _mean_rows(last_rows[-3:]) if last_rows else {},
            "train_seconds": round(seconds, 2),
            "snippets": len(datamodule.train_set),
            "validation_mode": datamodule.val_mode,
            "pose_source": recipe.pose.source,
            "rectify": module.rectify_net is not None,
            "init": module.init_info,
        }
        if datamodule.base.bad.total:
            # Scenes dropped when the data opened (data.on_error=skip), e.g. without poses.txt.
            metrics["skipped_train"] = datamodule.base.bad.summary()
        if module.last_validation is not None:
            val = {k: v for k, v in module.last_validation.items() if k != "step"}
            metrics["validation"] = val
            metrics["val_loss"] = val.get("val_loss")
        metrics["torch_threads"] = torch.get_num_threads()
        check = depth_change(previous.get("validation_start"), metrics.get("validation"))
        if check is not None:
            metrics.update(check)
            if check["depth_worse"]:
                print(depth_worse_warning(STAGE_NAMES[recipe.version], check), flush=True)
        write_metrics(run_dir, metrics)
        metrics = read_metrics(run_dir)
    return metrics


def depth_change(
    start: Mapping[str, Any] | None, end: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """``{"abs_rel_start", "abs_rel_end", "depth_worse"}`` from the held-out validation before
    and after training (depth mode), or None without both. ``depth_worse`` is True when the
    stage ended with a higher median-scaled AbsRel than its initial model had: it made depth
    worse, whatever its losses did."""
    a = (start or {}).get("abs_rel")
    b = (end or {}).get("abs_rel")
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return {"abs_rel_start": float(a), "abs_rel_end": float(b), "depth_worse": bool(b > a)}


def depth_worse_warning(stage: str, check: Mapping[str, Any]) -> str:
    """The run summary's loud line for a stage that made held-out depth worse."""
    a, b = check["abs_rel_start"], check["abs_rel_end"]
    return (
        f"WARNING: the {stage} stage made held-out depth WORSE: AbsRel {a:.4f} -> {b:.4f} "
        f"({100 * (b / a - 1):+.1f} %); metrics.json has depth_worse: true"
    )
