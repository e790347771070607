"""LeReS relative-depth network (inference variant) and its reference pre-processing.

Specification: teacher-and-cka.md part A: A2 (the inference pipeline: 448 x 448 RGB input,
ImageNet mean/std, shift ``raw - min + 0.01``), A3 (module tree, encoder, FTB / FFM / AO decoder
blocks, shapes, parameter counts), A4 (checkpoint layout and loading) and pitfalls C1-C9.

State-dict layout (identical to the released ``res50.pth`` / ``res101.pth`` after an optional
``module.`` prefix is stripped; checked against ``shared/data/leres_*_state_dict_shapes.json``)::

    depth_model.encoder_modules.encoder.*   timm ResNet-50 / ResNeXt-101 32x8d, no fc
    depth_model.decoder_modules.{conv, conv1, ffm2, ffm1, ffm0, outconv}.*

The encoder is timm's ResNet, whose key names and arithmetic equal torchvision's (A3.2); its
``fc`` / pooling are dropped (``num_classes=0``) so no extra keys appear.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesadepth.errors import ConfigError, DataError, MissingFileError

__all__ = [
    "AO",
    "BACKBONES",
    "FFM",
    "FTB",
    "INPUT_SIZE",
    "LeReS",
    "LeReSDecoder",
    "RESIZE_BACKENDS",
    "SHIFT_EPSILON",
    "TORCH_RESIZE_NOTE",
    "build_leres",
    "leres_input",
    "load_leres",
    "resize_float",
    "resize_uint8",
    "resolve_resize_backend",
    "shift_depth",
]

#: Network input side (A2 step 3); must be a multiple of 32 (A3.4).
INPUT_SIZE = 448
#: The "+ 0.01" of the shift rule (A2 step 6).
SHIFT_EPSILON = 0.01
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Project backbone name -> (timm model name, released file name) (A3.1, A4).
BACKBONES: dict[str, tuple[str, str]] = {
    "resnet50": ("resnet50", "res50.pth"),
    "resnext101": ("resnext101_32x8d", "res101.pth"),
}
_README = "https://github.com/aim-uofa/AdelaiDepth/tree/main/LeReS"
_PREFIX = "depth_model."
_ENCODER = "depth_model.encoder_modules.encoder."

# Decoder constants of the reference (A3.1).
_IN_CHANNELS = (256, 512, 1024, 2048)
_MID_CHANNELS = (256, 256, 256, 512)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True)


def _up2(x: Tensor) -> Tensor:
    # Every decoder upsampling of LeReS is x2 bilinear with align_corners=True (pitfall C5).
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class FTB(nn.Module):
    """Feature transfer block (A3.3): conv1, then a residual conv branch, then ReLU.

    ``conv_branch`` keeps the reference's Sequential indices: 0 ReLU, 1 conv, 2 BN, 3 ReLU,
    4 conv. ``inplace_quirk=True`` (default) reproduces what the reference computes: its leading
    ReLU is in-place on the very tensor that is also the residual, so
    ``y = relu(r + branch'(r))`` with ``r = relu(conv1(x))`` (branch' = layers 1..4). The
    released weights were trained this way. ``False`` gives the naive out-of-place form
    ``relu(c + branch(c))`` with ``c = conv1(x)`` (only meaningful for training from scratch).
    """

    def __init__(self, in_channels: int, mid_channels: int, inplace_quirk: bool = True) -> None:
        super().__init__()
        self.inplace_quirk = inplace_quirk
        self.conv1 = _conv3x3(in_channels, mid_channels)
        self.conv_branch = nn.Sequential(
            nn.ReLU(inplace=False),
            _conv3x3(mid_channels, mid_channels),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=False),
            _conv3x3(mid_channels, mid_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv1(x)
        if self.inplace_quirk:
            r = F.relu(c)
            return F.relu(r + self.conv_branch[1:](r))
        return F.relu(c + self.conv_branch(c))


class FFM(nn.Module):
    """Feature fusion module (A3.3): ``up2(ftb2(ftb1(low) + high))``."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, inplace_quirk: bool = True
    ) -> None:
        super().__init__()
        self.ftb1 = FTB(in_channels, mid_channels, inplace_quirk)
        self.ftb2 = FTB(mid_channels, out_channels, inplace_quirk)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        return _up2(self.ftb2(self.ftb1(low) + high))


class AO(nn.Module):
    """Adaptive output head (A3.3; not the auxiliary branch): conv, BN, ReLU, conv, x2 up."""

    def __init__(self, in_channels: int, out_channels: int = 1) -> None:
        super().__init__()
        self.adapt_conv = nn.Sequential(
            _conv3x3(in_channels, in_channels // 2),
            nn.BatchNorm2d(in_channels // 2),
            nn.ReLU(inplace=False),
            _conv3x3(in_channels // 2, out_channels),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.adapt_conv(x)


class LeReSDecoder(nn.Module):
    """The main LeReS decoder (A3.3); features f1..f4 (strides 4..32) -> (B, 1, H, W), unbounded."""

    def __init__(
        self,
        in_channels: Sequence[int] = _IN_CHANNELS,
        mid_channels: Sequence[int] = _MID_CHANNELS,
        inplace_quirk: bool = True,
    ) -> None:
        super().__init__()
        ic, mc = tuple(in_channels), tuple(mid_channels)
        self.conv = FTB(ic[3], mc[3], inplace_quirk)
        self.conv1 = _conv3x3(mc[3], mc[2])
        self.ffm2 = FFM(ic[2], mc[2], mc[2], inplace_quirk)
        self.ffm1 = FFM(ic[1], mc[1], mc[1], inplace_quirk)
        self.ffm0 = FFM(ic[0], mc[0], mc[0], inplace_quirk)
        self.outconv = AO(mc[0], 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # A3.6: normal(0, 0.01) convs with zero bias, BN (1, 0); released checkpoints overwrite.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        f1, f2, f3, f4 = features
        a = _up2(self.conv1(self.conv(f4)))
        a = self.ffm2(f3, a)
        a = self.ffm1(f2, a)
        a = self.ffm0(f1, a)
        return self.outconv(a)


class _EncoderModules(nn.Module):
    """Reference ``DepthNet``: holds only ``encoder`` (a timm ResNet without classifier)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> list[Tensor]:
        e = self.encoder
        x = e.maxpool(e.act1(e.bn1(e.conv1(x))))
        f1 = e.layer1(x)
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        f4 = e.layer4(f3)
        return [f1, f2, f3, f4]


class _DepthModel(nn.Module):
    """Reference ``DepthModel``: ``encoder_modules`` + ``decoder_modules``."""

    def __init__(self, encoder: nn.Module, decoder: LeReSDecoder) -> None:
        super().__init__()
        self.encoder_modules = _EncoderModules(encoder)
        self.decoder_modules = decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder_modules(self.encoder_modules(x))


class LeReS(nn.Module):
    """LeReS depth network (the reference ``RelDepthModel`` without auxiliary branch, A3.1).

    ``forward``: normalised RGB (B, 3, H, W), H and W multiples of 32 (448 for the reference)
    -> raw relative depth (B, 1, H, W), larger = farther, possibly negative; apply
    :func:`shift_depth` to get the reference's positive depth. Use
    :func:`build_leres` for the two released variants.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: Sequence[int] = _IN_CHANNELS,
        mid_channels: Sequence[int] = _MID_CHANNELS,
        inplace_quirk: bool = True,
        backbone: str = "custom",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.depth_model = _DepthModel(
            encoder, LeReSDecoder(in_channels, mid_channels, inplace_quirk)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LeReS: expected images (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(
                f"LeReS: input {h} x {w} is not a multiple of 32 in both sides (the decoder's "
                f"feature additions need it; the reference uses {INPUT_SIZE} x {INPUT_SIZE})"
            )
        return self.depth_model(x)


def build_leres(
    backbone: str = "resnext101", inplace_quirk: bool = True, **timm_kwargs: Any
) -> LeReS:
    """The LeReS network for ``backbone`` ``"resnet50"`` or ``"resnext101"`` (A3), untrained.

    Parameters (A3.5): ResNet-50 52,126,529 (406 state-dict entries), ResNeXt-101 32x8d
    115,360,833 (712). ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``device="meta"``).
    Encoder BN weights start at 1 (A3.6), not timm's zero-initialised last BN.
    """
    import timm

    if backbone not in BACKBONES:
        raise ConfigError(
            f"LeReS backbone {backbone!r} is not supported; choose from {sorted(BACKBONES)}"
        )
    encoder = timm.create_model(
        BACKBONES[backbone][0],
        pretrained=False,
        num_classes=0,
        global_pool="",
        zero_init_last=False,
        **timm_kwargs,
    )
    device = timm_kwargs.get("device")
    # The decoder follows the encoder's device (e.g. "meta" for shape-only builds).
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return LeReS(encoder, inplace_quirk=inplace_quirk, backbone=backbone)


# ----------------------------------------------------------------------------- checkpoints


def _missing_weights(path: Path, backbone: str | None) -> MissingFileError:
    if backbone in BACKBONES:
        name = BACKBONES[backbone][1]
        what = f"LeReS {backbone} checkpoint ({name})"
    else:
        name, what = "res101.pth", "LeReS checkpoint (res101.pth or res50.pth)"
    return MissingFileError(
        path,
        what,
        f"the weights are not on a model hub: download {name} through the links in the LeReS "
        f"README ({_README}), put it e.g. at weights/{name} and pass that path, e.g. "
        f"--teacher leres:{backbone or 'resnext101'}:weights/{name}",
    )


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The RelDepthModel state dict inside a released or training checkpoint (A4)."""
    if not isinstance(obj, Mapping):
        raise DataError(path, f"expected a dict checkpoint, found {type(obj).__name__}")
    if "depth_model" in obj and isinstance(obj["depth_model"], Mapping):
        # Released inference files: {depth_model, shift_model, focal_model}; only the first
        # matters for pseudo-depth, the point-cloud models are ignored.
        sd = dict(obj["depth_model"])
    elif "model_state_dict" in obj and isinstance(obj["model_state_dict"], Mapping):
        sd = dict(obj["model_state_dict"])  # training checkpoint of the LeReS training code
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = dict(obj)  # a bare state dict (as torch.save(model.state_dict()) writes it)
    else:
        raise DataError(
            path,
            "expected a LeReS checkpoint: a dict with 'depth_model' (res50.pth / res101.pth), "
            f"'model_state_dict' (training) or a bare state dict; found keys {sorted(obj)[:6]}",
        )
    # Official rule: strip "module." only when every key carries it (DataParallel).
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    # The training-only auxiliary branch is not part of the inference network (A3.7).
    return {k: v for k, v in sd.items() if not k.startswith("depth_model.auxi_modules.")}


def detect_backbone(state_dict: Mapping[str, Any]) -> str:
    """``"resnext101"`` or ``"resnet50"`` from a LeReS state dict (ResNeXt-101 has layer3.6+)."""
    if any(k.startswith(_ENCODER + "layer3.6.") for k in state_dict):
        return "resnext101"
    conv2 = state_dict.get(_ENCODER + "layer1.0.conv2.weight")
    if conv2 is not None and tuple(conv2.shape)[1] == 8:
        return "resnext101"  # grouped 3x3 (groups 32) without the deeper stage: still ResNeXt
    return "resnet50"


def load_leres(
    path: str | os.PathLike[str],
    backbone: str | None = None,
    inplace_quirk: bool = True,
    model: LeReS | None = None,
) -> LeReS:
    """Build the LeReS network and load a released checkpoint strictly (A4), in eval mode.

    Accepts ``{'depth_model': sd, 'shift_model': ..., 'focal_model': ...}`` (``res50.pth``,
    ``res101.pth``), a training checkpoint (``model_state_dict``; ``auxi_modules`` dropped) or a
    bare state dict, with or without a leading ``module.``. ``backbone`` None detects it from
    the keys; a given backbone that does not match the file is an error naming both. Missing
    ``num_batches_tracked`` entries are tolerated (they do not affect inference). Loading never
    executes pickled code (:func:`mesadepth.io.safe_torch_load`). ``model`` loads into that
    network instead of a released architecture (same strict rules).
    """
    from mesadepth.io import safe_torch_load

    path = Path(path)
    if not path.is_file():
        raise _missing_weights(path, backbone)
    sd = _extract_state_dict(safe_torch_load(path), path)
    if model is None:
        found = detect_backbone(sd)
        if backbone is None:
            backbone = found
        elif backbone not in BACKBONES:
            raise ConfigError(
                f"LeReS backbone {backbone!r} is not supported; choose from {sorted(BACKBONES)}"
            )
        elif found != backbone:
            raise DataError(
                path,
                f"holds a LeReS {found} checkpoint ({len(sd)} entries) but backbone {backbone} "
                f"was requested; use leres:{found}:{path} (res50.pth = resnet50, res101.pth = "
                "resnext101)",
            )
        model = build_leres(backbone, inplace_quirk=inplace_quirk)
    backbone = model.backbone
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = value
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise DataError(
            path,
            f"does not match the LeReS {backbone} network ({len(own)} entries expected, "
            f"'depth_model.' prefix included): {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), shape mismatches "
            f"{shapes[:3]}",
        )
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- pre-processing


#: ``resize`` values of the LeReS pre-processing: ``opencv`` (the reference, default), ``torch``
#: (an approximation) and ``auto`` (OpenCV when installed, else torch with a warning).
RESIZE_BACKENDS = ("opencv", "torch", "auto")
#: What the torch resize changes against the reference (A2 steps 3 and 7), for warnings and records.
TORCH_RESIZE_NOTE = (
    "the torch bilinear resize replaces the reference's OpenCV resize (A2 steps 3 and 7): the "
    f"{INPUT_SIZE}x{INPUT_SIZE} uint8 input differs from OpenCV's by 1 grey level on ~12 % of "
    "pixels (OpenCV rounds its fixed-point weights), and LeReS amplifies that: the uint16 "
    "pseudo-depth no longer matches the reference pipeline's (most pixels move, by up to a few "
    "hundred units); resize=opencv (the default) reproduces it"
)
_NO_OPENCV = (
    "OpenCV is not installed, but the LeReS teacher resizes with it by default (it is the "
    "reference pipeline's resize, A2): install the dependency with pip install "
    "opencv-python-headless (the version pinned in requirements.lock), or accept an "
    "approximate pseudo-depth with resize=torch"
)


def _cv2() -> Any:
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError:
        return None
    return cv2


def resolve_resize_backend(backend: str = "opencv") -> str:
    """``opencv`` / ``torch`` / ``auto`` -> the backend to use, ``"opencv"`` or ``"torch"``.

    ``opencv`` without OpenCV installed raises :class:`ConfigError` saying how to install it;
    ``auto`` then falls back to torch with a ``UserWarning`` (never silently).
    """
    if backend not in RESIZE_BACKENDS:
        raise ConfigError(
            f"resize backend must be one of {', '.join(RESIZE_BACKENDS)}, got {backend!r}"
        )
    if backend == "torch":
        return "torch"
    if _cv2() is not None:
        return "opencv"
    if backend == "opencv":
        raise ConfigError(_NO_OPENCV)
    warnings.warn(
        f"resize=auto: {_NO_OPENCV}. Falling back to torch: {TORCH_RESIZE_NOTE}",
        UserWarning,
        stacklevel=2,
    )
    return "torch"


def resize_uint8(image: np.ndarray, size: int, backend: str = "opencv") -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear with half-pixel centres (A2 step 3).

    ``backend``: ``"opencv"`` (the reference call ``cv2.resize(rgb, (size, size))``, i.e.
    ``INTER_LINEAR``: fixed-point weights of 1/2048, rounded; bit-faithful; needs
    ``opencv-python-headless``), ``"torch"`` (float bilinear, align_corners=False, no antialias,
    rounded half to even: within 1 grey level of OpenCV on ~12 % of pixels, A2) or ``"auto"``
    (:func:`resolve_resize_backend`). Returns the image and the backend used.
    """
    used = resolve_resize_backend(backend)
    if used == "opencv":
        cv2 = _cv2()
        img = np.ascontiguousarray(image)  # OpenCV refuses some strided views (e.g. [..., ::-1])
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR), used
    # A writable copy: frames read from files are read-only, which torch.from_numpy warns about.
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    y = y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    return y.numpy(), used


def resize_float(depth: np.ndarray, height: int, width: int, backend: str = "opencv") -> np.ndarray:
    """(h, w) float32 -> (height, width) float32, bilinear half-pixel, no antialias (A2 step 7).

    ``opencv``: the reference call ``cv2.resize(pred, (width, height))`` (float weights);
    ``torch``: ``F.interpolate`` (<= 5e-5 apart on [0, 1], A2); ``auto`` as
    :func:`resolve_resize_backend`.
    """
    if resolve_resize_backend(backend) == "opencv":
        cv2 = _cv2()
        d = np.ascontiguousarray(depth, dtype=np.float32)
        return cv2.resize(d, (width, height), interpolation=cv2.INTER_LINEAR)
    t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None, None]
    y = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return y[0, 0].numpy()


def leres_input(
    images: Sequence[np.ndarray], size: int = INPUT_SIZE, backend: str = "opencv"
) -> tuple[Tensor, str]:
    """RGB uint8 images (any sizes) -> the normalised batch (B, 3, size, size) float32 (A2 2-4).

    Each image is resized (aspect ratio not kept) to size x size as uint8, divided by 255 and
    normalised with ImageNet mean/std. Returns the batch and the resize backend used.
    """
    if size % 32:
        raise ConfigError(f"LeReS input size must be a multiple of 32, got {size}")
    used = resolve_resize_backend(backend)
    resized = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(
                f"LeReS input {i}: expected (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}"
            )
        resized.append(resize_uint8(img, size, used)[0])
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, used


def shift_depth(raw: Tensor, per_image: bool = True, epsilon: float = SHIFT_EPSILON) -> Tensor:
    """``raw - min + epsilon`` (A2 step 6): positive, affine-invariant depth, same shape.

    ``per_image=True`` (default, A8) takes the minimum of each image; ``False`` reproduces the
    reference literally, whose minimum runs over the whole batch tensor (only equal to the
    per-image rule at batch size 1, pitfall C6). raw: (B, ...).
    """
    if per_image:
        mins = raw.flatten(1).amin(dim=1).view(-1, *([1] * (raw.dim() - 1)))
        return raw - mins + epsilon
    return raw - raw.min() + epsilon
