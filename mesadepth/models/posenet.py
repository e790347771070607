"""PoseNet (spec 2.3) and the ResNet pieces every SC-Depth network shares (spec 2.1).

Specification: geometric-and-supervised-pretraining.md sections 2.1 (ResNet encoders, 6-channel
ImageNet initialisation), 2.3 (pose decoder, 0.01 output scaling), 8 (state-dict names) and
pitfall 15 (ImageNet weights come from a local file; conv1 duplicated and halved for 6 channels).

The ResNets are timm's (``resnet18`` ...), whose parameter names equal torchvision's (the
reference's encoder), so a torchvision or timm ImageNet file loads without renaming. They are
built with ``zero_init_last=False``: timm otherwise zeroes the last BatchNorm of every block,
whereas the reference's torchvision ResNet keeps the PyTorch default (weight 1) when it is not
loaded from ImageNet.

State-dict layout of :class:`PoseNet` / :class:`~mesadepth.models.rectify.RectifyNet`:
``encoder.<torchvision ResNet key>`` (no ``fc.*``) and ``decoder.conv_squeeze.*`` /
``decoder.convs_pose.{0,1,2}.*`` -- the reference's ``{net}.encoder.encoder.*`` with the doubled
prefix collapsed and the unused classifier dropped (:mod:`mesadepth.models.sc_depth`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.io import safe_torch_load

__all__ = [
    "IMAGENET_RESNET_URLS",
    "PoseDecoder",
    "PoseNet",
    "adapt_first_conv",
    "create_resnet",
    "load_imagenet_resnet",
    "read_imagenet_resnet",
    "resnet_name",
]

PathLike = str | os.PathLike[str]

IMAGENET_RESNET_URLS: dict[int, str] = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    152: "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}
"""torchvision's IMAGENET1K_V1 files (the weights the reference loads, spec 2.1), by depth."""

POSE_SCALE = 0.01
"""Spec 2.3: the pose decoder's output is multiplied by 0.01."""


def resnet_name(num_layers: int) -> str:
    """timm model name for a ResNet depth: 18 -> ``"resnet18"`` (18, 34, 50, 101, 152)."""
    if isinstance(num_layers, bool) or num_layers not in IMAGENET_RESNET_URLS:
        raise ConfigError(
            f"num_layers: expected one of {sorted(IMAGENET_RESNET_URLS)} (ResNet depth), "
            f"got {num_layers!r}"
        )
    return f"resnet{num_layers}"


def create_resnet(
    num_layers: int = 18, in_chans: int = 3, features_only: bool = False
) -> nn.Module:
    """A randomly initialised timm ResNet with torchvision parameter names.

    ``features_only=True``: a timm ``FeatureListNet`` returning the five maps of spec 2.1
    (f0 = ReLU(BN(conv1)) at stride 2 before max-pooling, then layer1..layer4 at strides
    4..32). Otherwise the classifier-free network whose ``forward_features`` is f4.
    """
    name = resnet_name(num_layers)
    kwargs: dict = {"pretrained": False, "in_chans": in_chans, "zero_init_last": False}
    if features_only:
        return timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4), **kwargs)
    return timm.create_model(name, num_classes=0, global_pool="", **kwargs)


def _download_hint(num_layers: int) -> str:
    url = IMAGENET_RESNET_URLS.get(num_layers, IMAGENET_RESNET_URLS[18])
    return (
        f"ImageNet ResNet-{num_layers} weights are read from a local file only: download "
        f"torchvision's IMAGENET1K_V1 file {url} (or the model.safetensors of timm's "
        f"resnet{num_layers}.tv_in1k) and pass its path"
    )


def read_imagenet_resnet(path: PathLike, num_layers: int = 18) -> dict[str, Tensor]:
    """Read ImageNet ResNet weights (torchvision ``.pth`` or timm ``.safetensors``), ``fc.*`` dropped.

    Accepts a bare state dict or one inside ``state_dict`` / ``model``; strips ``module.``.
    Never executes pickled code (:func:`mesadepth.io.safe_torch_load`).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            path, f"ImageNet ResNet-{num_layers} weights", _download_hint(num_layers)
        )
    if path.suffix == ".safetensors":
        try:
            obj: object = load_file(os.fspath(path))
        except (SafetensorError, OSError) as err:
            raise DataError(path, f"not a readable safetensors file ({err})") from err
    else:
        obj = safe_torch_load(path)
    for container in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(container), Mapping):
            obj = obj[container]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise DataError(path, "expected a ResNet state dict (conv1.weight, bn1.*, layer1.* ...)")
    state = {}
    for key, value in obj.items():
        key = str(key).removeprefix("module.")
        if isinstance(value, Tensor) and not key.startswith("fc."):
            state[key] = value
    return state


def adapt_first_conv(weight: Tensor, in_chans: int) -> Tensor:
    """Spec 2.1: repeat a 3-channel conv1 kernel along the input axis and divide by the repeats.

    (64, 3, 7, 7) -> (64, 6, 7, 7) = cat([w, w], 1) / 2 for two stacked images, so the response
    to two identical images equals the 3-channel network's response to one.
    """
    if weight.dim() != 4 or in_chans % weight.shape[1]:
        raise ValueError(
            f"adapt_first_conv: cannot map a kernel of shape {tuple(weight.shape)} to {in_chans} "
            "input channels (expected a multiple of its input channels)"
        )
    repeats = in_chans // weight.shape[1]
    return torch.cat([weight] * repeats, dim=1) / repeats


def _mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str:
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    shapes = sorted(
        f"{k} (file {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    )
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape-mismatched", shapes),
    ):
        if keys:
            parts.append(
                f"{len(keys)} {label} key(s): "
                + ", ".join(keys[:5])
                + (", ..." if len(keys) > 5 else "")
            )
    return "; ".join(parts)


def load_strict(module: nn.Module, state: Mapping[str, Tensor], path: PathLike, what: str) -> None:
    """Load ``state`` into ``module``; any key or shape mismatch is a DataError naming the keys."""
    problem = _mismatch(module.state_dict(), state)
    if problem:
        raise DataError(path, f"weights do not match {what}: {problem}")
    module.load_state_dict(dict(state), strict=True)


def load_imagenet_resnet(model: nn.Module, path: PathLike, num_layers: int = 18) -> None:
    """Load ImageNet weights into a :func:`create_resnet` model, adapting conv1 to its channels.

    The load is complete (strict): every parameter and BatchNorm buffer is overwritten, as in
    the reference (spec 2.1). A file for another depth is a DataError listing the keys.
    """
    state = read_imagenet_resnet(path, num_layers)
    target = model.state_dict()
    conv1 = state.get("conv1.weight")
    want = target["conv1.weight"].shape[1]
    if conv1 is not None and conv1.dim() == 4 and conv1.shape[1] != want:
        state["conv1.weight"] = adapt_first_conv(conv1, want)
    load_strict(model, state, path, f"an ImageNet ResNet-{num_layers} ({want}-channel input)")


class PoseDecoder(nn.Module):
    """Spec 2.3 decoder on f4: 1x1 squeeze + ReLU, two 3x3 + ReLU, 1x1 to ``num_outputs``, mean, scale.

    (B, in_channels, h, w) -> (B, num_outputs) = ``scale`` x spatial mean of the last 1x1 conv.
    PyTorch default initialisation (as the reference).
    """

    def __init__(
        self, in_channels: int = 512, num_outputs: int = 6, scale: float = POSE_SCALE
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        self.num_outputs = int(num_outputs)
        self.conv_squeeze = nn.Conv2d(in_channels, 256, 1)
        self.convs_pose = nn.ModuleList(
            [
                nn.Conv2d(256, 256, 3, stride=1, padding=1),
                nn.Conv2d(256, 256, 3, stride=1, padding=1),
                nn.Conv2d(256, num_outputs, 1),
            ]
        )
        self.relu = nn.ReLU()

    def forward(self, feature: Tensor) -> Tensor:
        x = self.relu(self.conv_squeeze(feature))
        x = self.relu(self.convs_pose[0](x))
        x = self.relu(self.convs_pose[1](x))
        x = self.convs_pose[2](x)
        return self.scale * x.mean(dim=(2, 3))


class PairRegressor(nn.Module):
    """A 6-channel ResNet on two stacked images + :class:`PoseDecoder` (base of PoseNet and ARN)."""

    downsample: bool = False

    def __init__(
        self,
        num_layers: int = 18,
        pretrained: PathLike | None = None,
        num_outputs: int = 6,
        scale: float = POSE_SCALE,
    ) -> None:
        super().__init__()
        self.num_layers = int(num_layers)
        self.encoder = create_resnet(self.num_layers, in_chans=6)
        if pretrained is not None:
            load_imagenet_resnet(self.encoder, pretrained, self.num_layers)
        self.decoder = PoseDecoder(self.encoder.num_features, num_outputs, scale)

    def prepare(self, x: Tensor) -> Tensor:
        """Hook for the input (B, 6, H, W) before the encoder; identity for PoseNet."""
        return x

    def forward(self, img_a: Tensor, img_b: Tensor) -> Tensor:
        if img_a.dim() != 4 or img_a.shape[1] != 3 or img_a.shape != img_b.shape:
            raise ValueError(
                f"{type(self).__name__}: expected two (B, 3, H, W) images of equal shape, got "
                f"{tuple(img_a.shape)} and {tuple(img_b.shape)}"
            )
        x = self.prepare(torch.cat([img_a, img_b], dim=1))
        return self.decoder(self.encoder.forward_features(x))


class PoseNet(PairRegressor):
    """SC-Depth PoseNet (spec 2.3): (I_a, I_b) -> (B, 6) = (t_x, t_y, t_z, r_x, r_y, r_z).

    Inputs are two (B, 3, H, W) images normalised as spec 1.5, stacked to 6 channels at full
    resolution; the output is 0.01 x the global mean of the last 1x1 conv, translation first,
    Euler angles in radians (the motion X_b = R X_a + t, spec 2.3). ``pretrained``: a local
    ImageNet ResNet file (:data:`IMAGENET_RESNET_URLS`), conv1 adapted per spec 2.1; ``None``
    leaves timm's random initialisation (e.g. before loading a checkpoint).
    """

    def __init__(
        self, num_layers: int = 18, pretrained: PathLike | None = None, scale: float = POSE_SCALE
    ) -> None:
        super().__init__(num_layers, pretrained, num_outputs=6, scale=scale)
