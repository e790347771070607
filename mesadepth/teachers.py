"""Pseudo-depth teachers behind one interface, and the SC-Depth pseudo-depth writer.

Specification: teacher-and-cka.md part A (A1 consumer, A2 LeReS pipeline, A5 writer, A6
transformers teachers, A7 precomputed files, A8 interface) and geometric-and-supervised-
pretraining.md sections 1.1 / 1.4 (``<scene>/leres_depth/*.png``, uint16, paired with the sorted
``*.jpg`` by position) and pitfall 10.

A teacher maps RGB uint8 images (H, W, 3) to float32 relative **depth** (H, W), larger =
farther, positive (a ``files`` teacher returns the stored values, >= 0). Teachers are built from
a spec string (:func:`build_teacher`)::

    leres:resnext101:weights/res101.pth      LeReS, the reference teacher (A2-A4)
    leres:resnet50:weights/res50.pth
    leres:weights/res101.pth                 backbone detected from the file
    hf:models/depth-anything-v2-small        transformers folder, offline (A6)
    files:/data/precomputed                  precomputed PNG / .npy maps (A7)
    mesadepth:runs/demo/teacher/model.safetensors   a project depth model (the demo's teacher)

Options follow the target as ``,key=value`` items, e.g. ``hf:models/dpt-large,output=
inverse_relative,delta=0.01,backend=pil``; see :data:`TEACHER_OPTIONS`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from mesadepth.data.video import PSEUDO_DEPTH_DIR, VideoScene
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.io import (
    PathLike,
    atomic_path,
    atomic_write_text,
    read_png_uint16,
    read_rgb,
    write_png,
)

if TYPE_CHECKING:
    from mesadepth.models.leres import LeReS

__all__ = [
    "DEFAULT_DELTA",
    "PSEUDO_DEPTH_MAX",
    "FilesTeacher",
    "FrameRef",
    "HFTeacher",
    "LeReSTeacher",
    "MesaTeacher",
    "TEACHER_KINDS",
    "TEACHER_OPTIONS",
    "Teacher",
    "build_teacher",
    "disparity_to_depth",
    "encode_pseudo_depth",
    "metric_to_depth",
    "parse_teacher_spec",
    "write_pseudo_depth_tree",
]

#: Value of every pseudo-depth map's maximum pixel (A2 step 8).
PSEUDO_DEPTH_MAX = 60000
#: Shift of the inverse-depth conversion and floor of the depth conversion (A6.4).
DEFAULT_DELTA = 0.01
#: Per-scene record of the teacher that wrote a pseudo-depth folder (not a ``*.png``).
TEACHER_FILE = "teacher.json"


# ----------------------------------------------------------------------------- conversions


def encode_pseudo_depth(depth: np.ndarray) -> np.ndarray:
    """Depth (H, W) -> uint16 ``trunc(float32(d / max(d)) * 60000)`` (A2 step 8, A5).

    Bit-faithful to the reference only in this order and precision: float32 ``d / max`` first,
    then ``* 60000``, then truncation. A map that is already encoded (integers, max exactly
    60000, e.g. copied by a ``files`` teacher) is returned unchanged: re-encoding it would lose
    one unit on ~2 % of its values through float32 rounding.
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"pseudo-depth must be (H, W), got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("pseudo-depth contains NaN/inf")
    if d.min() < 0:
        raise ValueError(f"pseudo-depth must be >= 0, found min {float(d.min()):g}")
    top = d.max()
    if not top > 0:
        raise ValueError("pseudo-depth is zero everywhere; expected some positive depth")
    if top == PSEUDO_DEPTH_MAX and np.array_equal(d, np.floor(d)):
        return d.astype(np.uint16)
    return ((d / top) * np.float32(PSEUDO_DEPTH_MAX)).astype(np.uint16)


def disparity_to_depth(disparity: np.ndarray, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Relative inverse depth -> depth (A6.4 step 2): ``1 / (d / max(d) + delta)``, float32.

    Negative values (bicubic undershoot) are clamped to 0 first, so the result lies in
    [1 / (1 + delta), 1 / delta]. ``delta`` is the arbitrary shift the inversion needs; the
    normal-based SC-DepthV3 losses depend on it, so keep it fixed across a study (pitfall C15).
    """
    if not delta > 0:
        raise ConfigError(f"delta must be > 0, got {delta!r}")
    d = np.clip(np.asarray(disparity, dtype=np.float64), 0.0, None)
    top = d.max() if d.size else 0.0
    if not top > 0:
        raise ValueError("the disparity map is zero everywhere; it has no depth to invert")
    return (1.0 / (d / top + delta)).astype(np.float32)


def metric_to_depth(depth: np.ndarray, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Metric depth -> strictly positive depth (A6.4 step 3): ``max(d, 0) + delta * max(d)``."""
    d = np.clip(np.asarray(depth, dtype=np.float64), 0.0, None)
    top = d.max() if d.size else 0.0
    if not top > 0:
        raise ValueError("the depth map is zero everywhere")
    return (d + delta * top).astype(np.float32)


# ----------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class FrameRef:
    """Where an image comes from: scene folder name, position among its sorted frames, count.

    Image teachers ignore it; the ``files`` teacher needs it to find the matching stored map.
    """

    scene: str
    index: int
    n_frames: int


@runtime_checkable
class Teacher(Protocol):
    """A pseudo-depth provider (A8).

    ``spec``: canonical spec string (identifies the teacher and its conversion options);
    ``metadata``: JSON-able description (teacher, checkpoint, input size, pre-processing
    backend, conversion rule); ``predict``: images (H, W, 3) uint8 RGB -> float32 depth (H, W),
    same sizes, larger = farther.
    """

    name: str
    spec: str

    @property
    def metadata(self) -> dict[str, Any]: ...

    def predict(
        self, images: Sequence[np.ndarray], frames: Sequence[FrameRef] | None = None
    ) -> list[np.ndarray]: ...


def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(
                f"teacher input {i}: expected (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}"
            )
        out.append(img)
    return out


def _groups_by_size(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of the images grouped by (H, W), so each group can be batched."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape[:2], []).append(i)
    return list(groups.values())


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"invalid device {device!r}: {err}") from err


class LeReSTeacher:
    """LeReS relative depth exactly as the reference computes it (A2), batched.

    Per image: RGB uint8 -> 448 x 448 -> ImageNet mean/std -> LeReS -> ``raw - min(raw) + 0.01``
    with the **per-image** minimum (the reference runs one image at a time; its batch-wide
    minimum would couple images, pitfall C6; ``per_image_min=False`` reproduces it) -> bilinear
    resize back to (H, W). The backbone default of the project is ResNeXt-101 (``res101.pth``,
    A2); ``backbone=None`` detects it from the file. ``model`` loads the checkpoint into that
    network instead of a released architecture (tests, custom encoders).

    ``resize``: ``opencv`` (default) resizes both ways with the reference's own OpenCV calls and
    reproduces its pseudo-depth (a missing OpenCV is an error that says how to install it);
    ``torch`` forces the torch bilinear resize, which differs from the reference (a
    ``UserWarning`` says how, and :attr:`metadata`, hence the pseudo-depth summary and
    ``teacher.json``, records it); ``auto`` is OpenCV when installed, else torch with a warning.
    """

    name = "leres"

    def __init__(
        self,
        checkpoint: PathLike,
        backbone: str | None = None,
        device: str | torch.device | None = "auto",
        input_size: int = 448,
        resize: str = "opencv",
        per_image_min: bool = True,
        model: LeReS | None = None,
    ) -> None:
        from mesadepth.models.leres import TORCH_RESIZE_NOTE, load_leres, resolve_resize_backend

        self.checkpoint = Path(checkpoint)
        self.device = _resolve_device(device)
        if input_size % 32:
            raise ConfigError(f"leres input_size must be a multiple of 32, got {input_size}")
        self.input_size = int(input_size)
        self.per_image_min = bool(per_image_min)
        # Settled once, before the weights load, so that every frame of a run uses the same
        # backend and a missing OpenCV is reported before any work.
        self.resize = resolve_resize_backend(resize)
        #: What this teacher does differently from the reference pipeline (A2), or None.
        self.reference_deviation: str | None = None
        if self.resize == "torch":
            self.reference_deviation = f"resize=torch: {TORCH_RESIZE_NOTE}"
            if resize == "torch":  # the auto fallback has already warned
                warnings.warn(
                    f"LeReS teacher: {self.reference_deviation}", UserWarning, stacklevel=2
                )
        self.model = load_leres(self.checkpoint, backbone, model=model).to(self.device).eval()
        self.backbone = getattr(self.model, "backbone", backbone or "custom")
        self.spec = (
            f"leres:{self.backbone}:{self.checkpoint.resolve()},input_size={self.input_size},"
            f"resize={self.resize},per_image_min={str(self.per_image_min).lower()}"
        )

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "teacher": self.name,
            "spec": self.spec,
            "backbone": self.backbone,
            "checkpoint": str(self.checkpoint),
            "input_size": [self.input_size, self.input_size],
            "preprocessing": f"RGB uint8 -> {self.input_size}x{self.input_size} bilinear "
            f"({self.resize}), /255, ImageNet mean/std",
            "conversion": "depth = raw - min(raw) + 0.01 ("
            + ("per image" if self.per_image_min else "batch minimum, as the reference")
            + f"), bilinear resize to the frame size ({self.resize})",
            "output": "relative depth",
            "resize": self.resize,
            "reference_deviation": self.reference_deviation,
        }

    @torch.no_grad()
    def predict(
        self, images: Sequence[np.ndarray], frames: Sequence[FrameRef] | None = None
    ) -> list[np.ndarray]:
        from mesadepth.models.leres import leres_input, resize_float, shift_depth

        images = _check_images(images)
        if not images:
            return []
        x, _ = leres_input(images, self.input_size, self.resize)
        raw = self.model(x.to(self.device))
        pred = shift_depth(raw, per_image=self.per_image_min).float().cpu().numpy()[:, 0]
        return [
            resize_float(p, img.shape[0], img.shape[1], self.resize)
            for p, img in zip(pred, images, strict=True)
        ]


# transformers model_type -> what predicted_depth means, where unambiguous (A6.1).
_METRIC_MODEL_TYPES = {"zoedepth", "glpn", "depth_pro"}
_HF_OUTPUTS = ("auto", "inverse_relative", "depth")


def infer_hf_output(config: Any) -> str | None:
    """``"inverse_relative"``, ``"depth"`` or None (unknown) from a transformers config (A6.1).

    Depth Anything: its ``depth_estimation_type`` (relative -> inverse depth, metric -> depth).
    DPT: MiDaS-style (ViT / BEiT / hybrid backbones) -> inverse depth; a DINOv2 backbone (the
    NYU / KITTI heads) -> metric depth (spec: "treat as metric", unverified). ZoeDepth, GLPN,
    DepthPro -> metric depth.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in ("depth_anything", "prompt_depth_anything"):
        kind = getattr(config, "depth_estimation_type", "relative")
        return "inverse_relative" if kind == "relative" else "depth"
    if model_type == "dpt":
        backbone = getattr(config, "backbone_config", None)
        if getattr(backbone, "model_type", None) == "dinov2":
            return "depth"
        return "inverse_relative"
    if model_type in _METRIC_MODEL_TYPES:
        return "depth"
    return None


class HFTeacher:
    """A transformers depth model loaded offline from a local folder (A6).

    The folder holds ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and
    ``preprocessor_config.json`` (the pre-processing is read from it). Both are loaded with
    ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``. Each image runs at the processor's
    resolution; ``post_process_depth_estimation`` resizes to (H, W) (bicubic); negatives are
    clamped; then A6.4: ``output=inverse_relative`` (Depth Anything, MiDaS DPT) ->
    ``1 / (d / max(d) + delta)``; ``output=depth`` (metric models) -> ``d + delta max(d)``;
    ``output=auto`` infers it (:func:`infer_hf_output`) and fails when it cannot.
    ``backend`` (``pil`` / ``torchvision`` / ``auto``) pins the processor implementation, whose
    resizing differs slightly (pitfall C13); the one used is recorded in :attr:`metadata`.
    """

    name = "hf"

    def __init__(
        self,
        folder: PathLike,
        device: str | torch.device | None = "auto",
        output: str = "auto",
        delta: float = DEFAULT_DELTA,
        backend: str = "auto",
    ) -> None:
        self.folder = Path(folder)
        self.device = _resolve_device(device)
        self.delta = float(delta)
        if not self.delta > 0:
            raise ConfigError(f"hf teacher: delta must be > 0, got {delta!r}")
        if output not in _HF_OUTPUTS:
            raise ConfigError(f"hf teacher: output must be one of {_HF_OUTPUTS}, got {output!r}")
        if backend not in ("auto", "pil", "torchvision"):
            raise ConfigError(
                f"hf teacher: backend must be auto, pil or torchvision, got {backend!r}"
            )
        expected = "config.json, model.safetensors (or pytorch_model.bin), preprocessor_config.json"
        if not self.folder.is_dir():
            raise MissingFileError(
                self.folder,
                "transformers depth model folder",
                f"expected {expected}, e.g. written by save_pretrained or a downloaded hub "
                "snapshot; nothing is fetched at run time",
            )
        for name in ("config.json", "preprocessor_config.json"):
            if not (self.folder / name).is_file():
                raise MissingFileError(
                    self.folder / name,
                    f"{name} of the transformers model",
                    f"the folder needs {expected}",
                )
        weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        if not any((self.folder / w).is_file() for w in weights):
            raise MissingFileError(
                self.folder / "model.safetensors",
                "transformers model weights",
                f"the folder needs {expected}",
            )
        # Offline for good: no code path may reach a hub while loading (A6.3).
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import transformers
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        except ImportError as err:
            raise ConfigError(
                "hf teachers need transformers: pip install 'mesadepth[hf]' "
                "(or pip install 'transformers>=4.40')"
            ) from err
        proc_kwargs: dict[str, Any] = {"local_files_only": True}
        if backend != "auto":
            if int(transformers.__version__.split(".")[0]) >= 5:
                proc_kwargs["backend"] = backend
            else:  # v4 chose the implementation with use_fast
                proc_kwargs["use_fast"] = backend == "torchvision"
        try:
            self.model, loading = AutoModelForDepthEstimation.from_pretrained(
                self.folder, local_files_only=True, output_loading_info=True
            )
            self.processor = AutoImageProcessor.from_pretrained(self.folder, **proc_kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(
                self.folder, f"cannot load a transformers depth model and processor: {err}"
            ) from err
        # transformers fills weights missing from the file with random values and only warns:
        # a teacher with random layers would write plausible-looking garbage.
        gaps = sorted(loading.get("missing_keys") or []) + sorted(
            str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys") or []
        )
        if gaps:
            raise DataError(
                self.folder,
                f"the weights do not cover the model of config.json: {len(gaps)} tensor(s) missing "
                f"or of another shape, e.g. {', '.join(gaps[:4])}",
            )
        self.model = self.model.to(self.device).eval()
        inferred = infer_hf_output(self.model.config)
        if output == "auto":
            if inferred is None:
                raise ConfigError(
                    f"hf teacher {self.folder}: cannot tell whether model_type "
                    f"{self.model.config.model_type!r} predicts inverse depth or depth; add "
                    "output=inverse_relative or output=depth to the spec"
                )
            output = inferred
        self.output = output
        self.backend = type(self.processor).__name__
        self.transformers_version = transformers.__version__
        self.spec = f"hf:{self.folder.resolve()},output={self.output},delta={self.delta:g},backend={backend}"

    @property
    def metadata(self) -> dict[str, Any]:
        conversion = (
            f"depth = 1 / (d / max(d) + {self.delta:g}) of the clamped disparity (A6.4)"
            if self.output == "inverse_relative"
            else f"depth = max(d, 0) + {self.delta:g} max(d) (A6.4)"
        )
        return {
            "teacher": self.name,
            "spec": self.spec,
            "folder": str(self.folder),
            "model_type": self.model.config.model_type,
            "output": self.output,
            "delta": self.delta,
            "processor": self.backend,
            "preprocessing": json.loads(
                (self.folder / "preprocessor_config.json").read_text(encoding="utf-8")
            ),
            "transformers": self.transformers_version,
            "conversion": conversion + "; bicubic post-processing to the frame size",
        }

    def _convert(self, d: np.ndarray) -> np.ndarray:
        if self.output == "inverse_relative":
            return disparity_to_depth(d, self.delta)
        return metric_to_depth(d, self.delta)

    @torch.no_grad()
    def raw(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The post-processed model output at each image's (H, W), before A6.4 (float32)."""
        from PIL import Image

        images = _check_images(images)
        out: list[np.ndarray | None] = [None] * len(images)
        for group in _groups_by_size(images):
            pil = [Image.fromarray(images[i], "RGB") for i in group]
            inputs = self.processor(images=pil, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device)
            result = self.model(pixel_values=pixels)
            sizes = [images[i].shape[:2] for i in group]
            if hasattr(self.processor, "post_process_depth_estimation"):
                maps = [
                    r["predicted_depth"]
                    for r in self.processor.post_process_depth_estimation(
                        result, target_sizes=sizes
                    )
                ]
            else:
                pred = result.predicted_depth[:, None]
                up = torch.nn.functional.interpolate(
                    pred, size=sizes[0], mode="bicubic", align_corners=False
                )
                maps = list(up[:, 0])
            for i, m in zip(group, maps, strict=True):
                out[i] = m.float().cpu().numpy()
        return [m for m in out if m is not None]

    def predict(
        self, images: Sequence[np.ndarray], frames: Sequence[FrameRef] | None = None
    ) -> list[np.ndarray]:
        outs = []
        for k, d in enumerate(self.raw(images)):
            try:
                outs.append(self._convert(d))
            except ValueError as err:
                raise DataError(
                    self.folder, f"prediction for image {k} of the batch: {err}"
                ) from err
        return outs


class FilesTeacher:
    """Precomputed pseudo-depth files (A7), paired with the frames by sorted position.

    Per scene, the first of ``<root>/<scene>/<subdir>``, ``<root>/training/<scene>/<subdir>``
    and ``<root>/<scene>`` holding ``*.png`` (uint16, read raw as float32, no rescaling) or
    ``*.npy`` (float32 (H, W)) files. ``format`` picks ``png`` / ``npy`` (``auto``: PNG when
    present). ``kind=depth`` (default) uses the values as they are; ``kind=inverse`` converts
    with A6.4 step 2 (``delta``). The file count must equal the scene's frame count and every
    map must have its frame's size; otherwise a :class:`DataError` names the file.
    """

    name = "files"

    def __init__(
        self,
        root: PathLike,
        kind: str = "depth",
        delta: float = DEFAULT_DELTA,
        format: str = "auto",
        subdir: str = PSEUDO_DEPTH_DIR,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(
                self.root,
                "folder of precomputed pseudo-depth",
                f"expected <scene>/{subdir}/*.png (uint16) or <scene>/*.npy (float32), one per frame",
            )
        if kind not in ("depth", "inverse"):
            raise ConfigError(f"files teacher: kind must be depth or inverse, got {kind!r}")
        if format not in ("auto", "png", "npy"):
            raise ConfigError(f"files teacher: format must be auto, png or npy, got {format!r}")
        self.kind, self.delta, self.format, self.subdir = kind, float(delta), format, subdir
        self._scenes: dict[str, list[Path]] = {}
        self.spec = (
            f"files:{self.root.resolve()},kind={kind},delta={self.delta:g},format={format},"
            f"subdir={subdir}"
        )

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "teacher": self.name,
            "spec": self.spec,
            "root": str(self.root),
            "kind": self.kind,
            "conversion": "values as stored"
            if self.kind == "depth"
            else f"depth = 1 / (d / max(d) + {self.delta:g}) (A6.4)",
        }

    def scene_files(self, scene: str, n_frames: int) -> list[Path]:
        """The sorted stored maps of ``scene``, checked to number ``n_frames``."""
        if scene in self._scenes:
            return self._scenes[scene]
        candidates = [
            self.root / scene / self.subdir,
            self.root / "training" / scene / self.subdir,
            self.root / scene,
        ]
        suffixes = {"auto": (".png", ".npy"), "png": (".png",), "npy": (".npy",)}[self.format]
        for folder in candidates:
            if not folder.is_dir():
                continue
            files = sorted(
                p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
            )
            for suffix in suffixes:  # PNG first: the SC-Depth file itself
                chosen = [p for p in files if p.name.endswith(suffix)]
                if chosen:
                    break
            if not chosen:
                continue
            if len(chosen) != n_frames:
                raise DataError(
                    folder,
                    f"holds {len(chosen)} *{chosen[0].suffix} pseudo-depth file(s) for scene "
                    f"{scene!r} with {n_frames} frame(s); expected one per frame (paired by "
                    "sorted position)",
                )
            self._scenes[scene] = chosen
            return chosen
        raise MissingFileError(
            candidates[0],
            f"precomputed pseudo-depth of scene {scene!r}",
            f"looked in {', '.join(str(c) for c in candidates)} for *{' / *'.join(suffixes)}",
        )

    def _read(self, path: Path) -> np.ndarray:
        if path.suffix == ".png":
            return read_png_uint16(path, "16-bit pseudo-depth PNG").astype(np.float32)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(path, f"expected a float32 (H, W) .npy: {err}") from err
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(path, f"expected a float (H, W) array, found {arr.dtype} {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise DataError(path, "contains NaN/inf")
        return arr.astype(np.float32)

    def predict(
        self, images: Sequence[np.ndarray], frames: Sequence[FrameRef] | None = None
    ) -> list[np.ndarray]:
        images = _check_images(images)
        if frames is None or len(frames) != len(images):
            raise ConfigError(
                "the files teacher needs the frame of every image (scene, position): it copies "
                "stored maps, it does not predict"
            )
        outs = []
        for img, ref in zip(images, frames, strict=True):
            path = self.scene_files(ref.scene, ref.n_frames)[ref.index]
            d = self._read(path)
            if d.shape != img.shape[:2]:
                raise DataError(
                    path,
                    f"is {d.shape[1]}x{d.shape[0]} (WxH) but frame {ref.index} of scene "
                    f"{ref.scene!r} is {img.shape[1]}x{img.shape[0]}",
                )
            if self.kind == "inverse":
                try:
                    d = disparity_to_depth(d, self.delta)
                except ValueError as err:
                    raise DataError(path, str(err)) from err
            outs.append(d)
        return outs


class MesaTeacher:
    """A project depth model (``mesadepth finetune``'s ``model.safetensors``) as teacher.

    The demo's stand-in for LeReS. Images go in as RGB / 255 (no mean/std, the fine-tuning
    convention) through the test-time protocol of ``mesadepth evaluate``: square windows of the
    shorter side resized to the encoder's input size, optional flip averaging; the output is the
    model's metric depth (sigmoid x max_depth, > 0) at the image size.
    """

    name = "mesadepth"

    def __init__(
        self,
        path: PathLike,
        device: str | torch.device | None = "auto",
        flip: bool = True,
        shift_window: bool = True,
    ) -> None:
        from mesadepth.models.depth_head import load_depth_model

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(
                self.path,
                "project depth model (.safetensors with encoder.* and decoder.*)",
                "written by `mesadepth finetune` as RUN/model.safetensors",
            )
        self.device = _resolve_device(device)
        self.model = load_depth_model(self.path).to(self.device).eval()
        size = self.model.encoder.patch_embed.img_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size[0] != size[1]:
            raise ConfigError(f"{self.path}: the teacher protocol needs a square input, got {size}")
        self.side = int(size[0])
        self.flip, self.shift_window = bool(flip), bool(shift_window)
        self.spec = (
            f"mesadepth:{self.path.resolve()},flip={str(self.flip).lower()},"
            f"shift_window={str(self.shift_window).lower()}"
        )

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "teacher": self.name,
            "spec": self.spec,
            "checkpoint": str(self.path),
            "input_size": [self.side, self.side],
            "preprocessing": "RGB / 255, square windows resized (bilinear) to the input size",
            "conversion": "metric depth as predicted (sigmoid x max_depth)",
            "flip": self.flip,
            "shift_window": self.shift_window,
        }

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        h, w = x.shape[-2:]
        if (h, w) != (self.side, self.side):
            x = f.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        y = self.model(x)
        if y.shape[-2:] != (h, w):
            y = f.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y

    @torch.no_grad()
    def predict(
        self, images: Sequence[np.ndarray], frames: Sequence[FrameRef] | None = None
    ) -> list[np.ndarray]:
        from mesadepth.evaluation.protocol import predict_with_tta

        images = _check_images(images)
        out: list[np.ndarray | None] = [None] * len(images)
        for group in _groups_by_size(images):
            x = torch.from_numpy(np.stack([images[i] for i in group])).permute(0, 3, 1, 2)
            x = x.float().div_(255.0).to(self.device)
            y = predict_with_tta(self._net, x, shift_window=self.shift_window, flip=self.flip)
            for i, d in zip(group, y[:, 0].float().cpu().numpy(), strict=True):
                out[i] = d
        return [d for d in out if d is not None]


# ----------------------------------------------------------------------------- specs


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


#: Options of each teacher kind (``,key=value`` in the spec or keyword arguments), with types.
TEACHER_OPTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "leres": {"input_size": int, "resize": str, "per_image_min": _to_bool},
    "hf": {"output": str, "delta": float, "backend": str},
    "files": {"kind": str, "delta": float, "format": str, "subdir": str},
    "mesadepth": {"flip": _to_bool, "shift_window": _to_bool},
}
TEACHER_KINDS: dict[str, str] = {
    "leres": "leres:[resnet50|resnext101:]PATH.pth   LeReS (res50.pth / res101.pth)",
    "hf": "hf:FOLDER   a transformers depth model saved locally (save_pretrained / hub snapshot)",
    "files": "files:FOLDER   precomputed <scene>/leres_depth/*.png or <scene>/*.npy",
    "mesadepth": "mesadepth:RUN/model.safetensors   a project depth model (mesadepth finetune)",
}


@dataclass
class TeacherSpec:
    """A parsed spec: kind, target path, LeReS backbone (or None) and typed options."""

    kind: str
    target: str
    backbone: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_teacher_spec(spec: str) -> TeacherSpec:
    """``KIND:TARGET[,key=value...]`` -> :class:`TeacherSpec` (see the module docstring)."""
    from mesadepth.models.leres import BACKBONES

    kinds = ", ".join(TEACHER_KINDS)
    if ":" not in spec:
        raise ConfigError(
            f"teacher spec {spec!r} has no kind; expected KIND:TARGET with KIND one of {kinds}, "
            "e.g. leres:resnext101:weights/res101.pth"
        )
    kind, rest = spec.split(":", 1)
    if kind not in TEACHER_KINDS:
        raise ConfigError(
            f"unknown teacher kind {kind!r} in {spec!r}; expected one of {kinds}: "
            + "; ".join(TEACHER_KINDS.values())
        )
    # Options are the trailing ",key=value" items; what precedes them is the path.
    parts = rest.split(",")
    n_path = len(parts)
    while n_path > 1 and "=" in parts[n_path - 1]:
        n_path -= 1
    target = ",".join(parts[:n_path])
    options: dict[str, Any] = {}
    for item in parts[n_path:]:
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    backbone = None
    if kind == "leres":
        head, sep, tail = target.partition(":")
        if sep and head in BACKBONES:
            backbone, target = head, tail
        elif sep and head in ("resnext101_32x8d", "resnet", "res50", "res101"):
            raise ConfigError(f"LeReS backbone {head!r} in {spec!r}: write resnet50 or resnext101")
    if not target:
        raise ConfigError(f"teacher spec {spec!r} names no path; e.g. {TEACHER_KINDS[kind]}")
    return TeacherSpec(kind, target, backbone, options)


def _typed_options(kind: str, options: Mapping[str, Any], spec: str) -> dict[str, Any]:
    allowed = TEACHER_OPTIONS[kind]
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(
                f"teacher {spec!r}: unknown option {key!r} for kind {kind}; expected one of "
                f"{', '.join(allowed) or '(none)'}"
            )
        try:
            out[key] = allowed[key](value)
        except ValueError as err:
            raise ConfigError(f"teacher {spec!r}: option {key}={value!r}: {err}") from err
    return out


def build_teacher(spec: str, device: str | torch.device | None = "auto", **options: Any) -> Teacher:
    """Build the teacher a spec string names (module docstring); ``options`` add to the spec's.

    Unknown kinds and options raise :class:`ConfigError` listing the valid ones; missing files
    raise :class:`MissingFileError` naming them (and, for LeReS, where to download them).
    """
    parsed = parse_teacher_spec(spec)
    opts = _typed_options(parsed.kind, {**parsed.options, **options}, spec)
    if parsed.kind == "leres":
        return LeReSTeacher(parsed.target, parsed.backbone, device=device, **opts)
    if parsed.kind == "hf":
        return HFTeacher(parsed.target, device=device, **opts)
    if parsed.kind == "files":
        return FilesTeacher(parsed.target, **opts)
    return MesaTeacher(parsed.target, device=device, **opts)


# ----------------------------------------------------------------------------- writer


@dataclass
class _SceneJob:
    scene: VideoScene
    out_dir: Path
    todo: list[int]
    skipped: int
    written: int = 0
    depth_min: float = float("inf")
    depth_max: float = float("-inf")


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header only."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except OSError as err:
        raise DataError(path, f"cannot read the image header: {err}") from err


def _list_scenes(split_dir: Path, scenes: Iterable[str] | None) -> list[Path]:
    if not split_dir.is_dir():
        raise MissingFileError(
            split_dir, "video split folder (SC-Depth layout: <scene>/*.jpg, cam.txt)"
        )
    if scenes is not None:
        names = list(scenes)
        missing = [n for n in names if not (split_dir / n).is_dir()]
        if missing:
            raise MissingFileError(split_dir / missing[0], f"scene folder {missing[0]!r}")
        return [split_dir / n for n in names]
    found = sorted(
        p
        for p in split_dir.iterdir()
        if p.is_dir()
        and any(q.suffix == ".jpg" and not q.name.startswith(".") for q in p.iterdir())
    )
    if not found:
        raise DataError(split_dir, "holds no scene folder with *.jpg frames")
    return found


def _plan_scene(scene_dir: Path, out_name: str, spec: str, overwrite: bool, npy: bool) -> _SceneJob:
    scene = VideoScene(scene_dir)
    out_dir = scene_dir / out_name
    stems = [f.stem for f in scene.all_frames]
    if len(set(stems)) != len(stems):
        raise DataError(scene_dir, "two frames share a file stem; cannot name one PNG per frame")
    expected = {f"{s}.png" for s in stems}
    existing = (
        sorted(
            p.name for p in out_dir.iterdir() if p.suffix == ".png" and not p.name.startswith(".")
        )
        if out_dir.is_dir()
        else []
    )
    foreign = [n for n in existing if n not in expected]
    if foreign:
        raise DataError(
            out_dir,
            f"holds {len(existing)} PNG(s) for {len(stems)} frame(s), {len(foreign)} of which "
            f"name no frame (e.g. {foreign[0]}); pseudo-depth is paired with the frames by "
            "sorted position, so the folder must hold exactly <frame stem>.png for each *.jpg. "
            "Move the folder away and run again",
        )
    todo: list[int] = []
    for i, (frame, stem) in enumerate(zip(scene.all_frames, stems, strict=True)):
        png = out_dir / f"{stem}.png"
        done = png.is_file() and (not npy or png.with_suffix(".npy").is_file())
        if overwrite or not done:
            todo.append(i)
            continue
        if _image_size(png) != _image_size(frame):
            h, w = _image_size(png)
            fh, fw = _image_size(frame)
            raise DataError(
                png,
                f"is {w}x{h} but its frame {frame.name} is {fw}x{fh}; pass --overwrite to "
                "rewrite this scene's pseudo-depth",
            )
    skipped = len(stems) - len(todo)
    record = out_dir / TEACHER_FILE
    if skipped and record.is_file():
        try:
            previous = json.loads(record.read_text(encoding="utf-8")).get("teacher", {}).get("spec")
        except (json.JSONDecodeError, AttributeError):
            previous = None
        if previous and previous != spec:
            raise DataError(
                record,
                f"{skipped} finished frame(s) were written by teacher {previous!r}, not {spec!r}; "
                "pass --overwrite to rewrite the scene with the new teacher (mixing teachers "
                "within a scene would mix conversions)",
            )
    return _SceneJob(scene, out_dir, todo, skipped)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array.astype(np.float32), allow_pickle=False)


def write_pseudo_depth_tree(
    teacher: Teacher,
    data: PathLike,
    split: str = "training",
    scenes: Iterable[str] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    npy: bool = False,
    progress: bool = True,
    out_name: str = PSEUDO_DEPTH_DIR,
) -> dict[str, Any]:
    """Write ``<data>/<split>/<scene>/leres_depth/<frame stem>.png`` for every ``*.jpg`` (A5).

    Every scene folder under ``<data>/<split>`` holding frames (or only ``scenes``) gets one
    uint16 PNG per frame (:func:`encode_pseudo_depth`: max -> 60000, truncated), written
    atomically, plus with ``npy`` the float32 depth as ``<stem>.npy`` beside it, and a
    ``teacher.json`` record. Frames whose outputs exist are skipped unless ``overwrite``; PNGs
    that name no frame, existing PNGs of another size, a different teacher's earlier output
    and teacher outputs of the wrong size are refused with a :class:`DataError`.
    Returns a JSON-able summary: per scene frames, written, skipped, depth range.

    Frames are decoded with the project's reader (no EXIF rotation), as the training loader
    reads them, so each map is aligned with the frame as trained on; the reference's OpenCV
    read would rotate a JPEG that carries an EXIF orientation (A2 step 1).
    """
    import time

    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    split_dir = Path(data) / split
    spec = teacher.spec
    jobs = [_plan_scene(d, out_name, spec, overwrite, npy) for d in _list_scenes(split_dir, scenes)]
    total = sum(len(j.todo) for j in jobs)
    bar = tqdm(total=total, desc="pseudo-depth", unit="frame", disable=not progress or total == 0)
    try:
        for job in jobs:
            frames = job.scene.all_frames
            if job.todo:
                # Recorded before the first frame, so that an interrupted scene is still
                # protected against being completed by another teacher.
                record = {
                    "teacher": teacher.metadata,
                    "frames": len(frames),
                    "encoding": (
                        f"uint16 PNG, trunc(float32(d / max d) * {PSEUDO_DEPTH_MAX}), one per *.jpg"
                    ),
                }
                atomic_write_text(job.out_dir / TEACHER_FILE, json.dumps(record, indent=2) + "\n")
            for start in range(0, len(job.todo), batch_size):
                idx = job.todo[start : start + batch_size]
                images = [read_rgb(frames[i]) for i in idx]
                refs = [FrameRef(job.scene.name, i, len(frames)) for i in idx]
                depths = teacher.predict(images, refs)
                if len(depths) != len(images):
                    raise DataError(
                        job.scene.path,
                        f"teacher {spec} returned {len(depths)} maps for {len(images)} frames",
                    )
                for i, img, d in zip(idx, images, depths, strict=True):
                    d = np.asarray(d, dtype=np.float32)
                    if d.shape != img.shape[:2]:
                        raise DataError(
                            frames[i],
                            f"teacher {spec} returned a {d.shape} map for a {img.shape[:2]} frame",
                        )
                    try:
                        code = encode_pseudo_depth(d)
                    except ValueError as err:
                        raise DataError(frames[i], f"teacher {spec}: {err}") from err
                    png = job.out_dir / f"{frames[i].stem}.png"
                    if npy:
                        _save_npy(png.with_suffix(".npy"), d)
                    write_png(png, code)
                    job.written += 1
                    job.depth_min = min(job.depth_min, float(d.min()))
                    job.depth_max = max(job.depth_max, float(d.max()))
                    bar.update(1)
            n_png = sum(1 for p in job.out_dir.glob("*.png") if not p.name.startswith("."))
            if n_png != len(frames):  # defensive: the plan guarantees it
                raise DataError(job.out_dir, f"holds {n_png} PNG(s) for {len(frames)} frame(s)")
    finally:
        bar.close()
    scenes_out = [
        {
            "scene": j.scene.name,
            "frames": len(j.scene.all_frames),
            "written": j.written,
            "skipped": j.skipped,
            "depth_min": j.depth_min if j.written else None,
            "depth_max": j.depth_max if j.written else None,
        }
        for j in jobs
    ]
    return {
        "teacher": teacher.metadata,
        "data": str(split_dir),
        "scenes": scenes_out,
        "frames_written": sum(j.written for j in jobs),
        "frames_skipped": sum(j.skipped for j in jobs),
        "seconds": round(time.perf_counter() - t0, 3),
    }
