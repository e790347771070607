"""DepthNet = encoder + the SC-Depth "DispNet" decoder (spec 2.2), for Swin-v2 and ResNet encoders.

Specification: geometric-and-supervised-pretraining.md sections 2.1 (ResNet encoder features),
2.2 (decoder), 8 (state-dict names), 9.2-9.5 (Swin-v2 adaptation: design guidance), pitfall 14.

Decoder parameter names follow the reference (``upconvs0.{0..4}.conv.conv.*`` with index 0 the
deepest level, ``upconvs1.*``, ``dispconvs.{level}.conv.*``), so a released ResNet DepthNet loads
after collapsing the doubled encoder prefix only (:mod:`mesadepth.models.sc_depth`).

How the Swin-v2 pyramid (strides 4, 8, 16, 32) reaches full resolution (spec 9.3): the decoder
keeps the reference's five levels, i.e. five x2 bilinear upsamplings from stride 32, and gives each
Swin stage the level the ResNet map of the same stride has in the reference (stride 16 -> level
4, 8 -> 3, 4 -> 2). Level 1 (stride 2) has no encoder map and by default no skip (its second conv
takes 32 instead of 96 channels); ``stem_channels > 0`` adds a stride-2 conv on the input image
that plays ResNet's f0. Why not e.g. one x4 upsampling from stride 4: it would change the
decoder's depth and its coarse-to-fine structure, while this mapping changes a single input width
and leaves every other layer, width and the output head exactly the reference's.

Swin-v2 stages 0-2 are the raw res-post-norm residual stream (see ``forward_pyramid``); their
scale depends on the encoder and its pre-training. ``skip_norm`` (default on for Swin, off for
ResNet) puts a per-pixel LayerNorm over channels on every skip map, as Swin dense-prediction
backbones do per tapped stage (spec 9.2); the deepest map already passes the encoder's final norm.
It also keeps the random-initialisation output near 0.2 regardless of the encoder's statistics.

``padding`` (default ``reflect``, the reference's ReflectionPad2d in every 3x3 conv and the stem)
or ``zeros``. It matters for Swin only: a Swin-v2 encoder has no absolute position embedding,
so with reflection padding the whole DepthNet is close to translation-equivariant and cannot
learn where in the image things usually are (the floor at the bottom is near), which a ResNet
encoder learns from its own zero padding. Measured on the demo world (96x128, true poses,
depth-only photometric training, 100 Adam steps at 1e-4, held-out scenes): reflect AbsRel
0.206 -> 0.208 with depth anti-correlated to the truth (r = -0.35); zeros 0.206 -> 0.170,
r = 0.48; a random ResNet-18 DepthNet (reflect decoder) 0.205 -> 0.168 in 150 steps. The
padding has no parameters: both load the same state dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesadepth.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SC_DEPTH_MEAN, SC_DEPTH_STD
from mesadepth.errors import ConfigError
from mesadepth.models.backbone import SWINV2_PRESETS, build_encoder
from mesadepth.models.posenet import (
    IMAGENET_RESNET_URLS,
    PathLike,
    create_resnet,
    load_imagenet_resnet,
)

__all__ = [
    "DEPTHNET_OPTIONS",
    "Conv3x3",
    "ConvBlock",
    "DepthNet",
    "DispNetDecoder",
    "build_depthnet",
    "build_resnet_encoder",
    "encoder_channels",
]

NUM_CH_DEC = (16, 32, 64, 128, 256)
DISP_SCALE = 10.0
MIN_DISP = 0.01
InputNorm = Literal["auto", "reference", "imagenet", "unit"]
Padding = Literal["reflect", "zeros"]
PADDINGS = ("reflect", "zeros")


def _pad(padding: str) -> nn.Module:
    if padding not in PADDINGS:
        raise ConfigError(f"decoder padding must be one of {PADDINGS}, got {padding!r}")
    return nn.ReflectionPad2d(1) if padding == "reflect" else nn.ZeroPad2d(1)


class Conv3x3(nn.Module):
    """Padding 1 (reflection as spec 2.2, or zeros) + 3x3 conv with bias."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding = "reflect") -> None:
        super().__init__()
        self.pad = _pad(padding)
        self.conv = nn.Conv2d(in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pad(x))


class ConvBlock(nn.Module):
    """:class:`Conv3x3` + ELU(alpha 1) (spec 2.2)."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding = "reflect") -> None:
        super().__init__()
        self.conv = Conv3x3(in_channels, out_channels, padding)
        self.nonlin = nn.ELU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.conv(x))


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DispNetDecoder(nn.Module):
    """Spec 2.2 decoder: five levels, widths (16, 32, 64, 128, 256), disparity 10 sigmoid + 0.01.

    ``num_ch_enc`` lists the encoder maps from fine to coarse: five entries for strides 2..32
    (ResNet f0..f4, the reference) or four for strides 4..32 (Swin-v2; level 1 then has no
    skip unless ``stem_channels`` > 0 adds a stride-2 ReflectionPad + Conv3x3/2 + ELU on the
    image). Level i = 4..0: ConvBlock_a, bilinear x2 (align_corners False), concat the map of
    stride 2^i if any, ConvBlock_b; head_i = Conv3x3(width_i -> 1) for i = 0..3.

    :meth:`forward` returns the full-resolution disparity (B, 1, H, W) in (0.01, 10.01); only
    head 0 is evaluated (the reference also evaluates the three coarse heads and discards them,
    pitfall 14: skipping them changes no output). The coarse heads stay in the state dict for
    checkpoint compatibility and :meth:`forward_multiscale` uses them; they receive no gradient
    in single-scale training, so under DDP use ``strategy: ddp_find_unused_parameters_true`` or
    ``coarse_heads=False``. PyTorch default initialisation (spec 2.2): the initial depth is about
    1 / (10 x 0.5 + 0.01) ~ 0.2 everywhere.
    """

    def __init__(
        self,
        num_ch_enc: Sequence[int],
        num_ch_dec: Sequence[int] = NUM_CH_DEC,
        *,
        stem_channels: int = 0,
        skip_norm: bool = False,
        coarse_heads: bool = True,
        padding: Padding = "reflect",
    ) -> None:
        super().__init__()
        _pad(padding)  # validates before any layer is built
        self.padding: str = padding
        enc = tuple(int(c) for c in num_ch_enc)
        dec = tuple(int(c) for c in num_ch_dec)
        if len(enc) not in (4, 5) or any(c <= 0 for c in enc):
            raise ConfigError(
                "num_ch_enc: expected 5 channel counts (strides 2..32, ResNet) or 4 (strides "
                f"4..32, Swin-v2), got {num_ch_enc!r}"
            )
        if len(dec) != 5 or any(c <= 0 for c in dec):
            raise ConfigError(f"num_ch_dec: expected 5 positive widths, got {num_ch_dec!r}")
        if stem_channels < 0 or (stem_channels and len(enc) == 5):
            raise ConfigError(
                f"stem_channels={stem_channels}: a stride-2 stem is only for 4-level encoders "
                "(the ResNet already gives a stride-2 map) and must be >= 0"
            )
        self.num_ch_enc = enc
        self.num_ch_dec = dec
        self.stem_channels = int(stem_channels)
        self.stem: nn.Module | None = None
        if stem_channels:
            self.stem = nn.Sequential(
                _pad(padding),
                nn.Conv2d(3, stem_channels, 3, stride=2),
                nn.ELU(inplace=True),
            )
        # Channels per stride 2, 4, 8, 16, 32 (None: no map at that stride).
        by_stride: list[int | None] = list(enc) if len(enc) == 5 else [stem_channels or None, *enc]
        self.skip_norms = (
            nn.ModuleList(_ChannelLayerNorm(c) for c in enc[:-1]) if skip_norm else None
        )
        self.upconvs0 = nn.ModuleList()
        self.upconvs1 = nn.ModuleList()
        for i in range(4, -1, -1):
            self.upconvs0.append(ConvBlock(by_stride[4] if i == 4 else dec[i + 1], dec[i], padding))
            skip = by_stride[i - 1] if i > 0 else None
            self.upconvs1.append(ConvBlock(dec[i] + (skip or 0), dec[i], padding))
        self.dispconvs = nn.ModuleList(
            Conv3x3(dec[i], 1, padding) for i in range(4 if coarse_heads else 1)
        )

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``DispNetDecoder(**dec.config)`` rebuilds it."""
        return {
            "num_ch_enc": list(self.num_ch_enc),
            "num_ch_dec": list(self.num_ch_dec),
            "stem_channels": self.stem_channels,
            "skip_norm": self.skip_norms is not None,
            "coarse_heads": len(self.dispconvs) == 4,
            "padding": self.padding,
        }

    @staticmethod
    def to_disp(logits: Tensor) -> Tensor:
        """disp = 10 sigmoid(x) + 0.01 (spec 2.2)."""
        return DISP_SCALE * torch.sigmoid(logits) + MIN_DISP

    def _levels(self, features: Sequence[Tensor], image: Tensor | None) -> list[Tensor]:
        """Outputs of ConvBlock_b per level, ordered 4..0 (strides 16, 8, 4, 2, 1)."""
        feats = list(features)
        if len(feats) != len(self.num_ch_enc) or any(
            f.dim() != 4 or f.shape[1] != c for f, c in zip(feats, self.num_ch_enc, strict=False)
        ):
            got = [tuple(f.shape) for f in feats]
            raise ValueError(
                f"DispNetDecoder: expected {len(self.num_ch_enc)} NCHW maps with channels "
                f"{list(self.num_ch_enc)} (fine to coarse), got shapes {got}"
            )
        if self.skip_norms is not None:
            feats[:-1] = [norm(f) for norm, f in zip(self.skip_norms, feats[:-1], strict=True)]
        if len(feats) == 4:
            f0 = None
            if self.stem is not None:
                if image is None:
                    raise ValueError("DispNetDecoder: the stride-2 stem needs the input image")
                f0 = self.stem(image)
            feats = [f0, *feats]
        x = feats[4]
        out = []
        for idx, i in enumerate(range(4, -1, -1)):
            x = F.interpolate(
                self.upconvs0[idx](x), scale_factor=2, mode="bilinear", align_corners=False
            )
            skip = feats[i - 1] if i > 0 else None
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = self.upconvs1[idx](x)
            out.append(x)
        return out

    def forward(self, features: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """Encoder maps (fine to coarse) -> disparity (B, 1, H, W); ``image`` feeds the stem."""
        return self.to_disp(self.dispconvs[0](self._levels(features, image)[-1]))

    def forward_multiscale(
        self, features: Sequence[Tensor], image: Tensor | None = None
    ) -> list[Tensor]:
        """Disparities of levels 0..3 (full resolution first, then H/2, H/4, H/8)."""
        if len(self.dispconvs) != 4:
            raise ConfigError("forward_multiscale needs a decoder built with coarse_heads=True")
        levels = self._levels(features, image)[::-1]  # level 0 first
        return [self.to_disp(head(x)) for head, x in zip(self.dispconvs, levels, strict=False)]


def encoder_channels(encoder: nn.Module) -> list[int]:
    """Channels of the maps an encoder gives DepthNet, fine to coarse.

    SwinV2Encoder: ``stage_channels`` (strides 4..32); timm ``features_only`` models:
    ``feature_info.channels()``.
    """
    if hasattr(encoder, "forward_pyramid") and hasattr(encoder, "stage_channels"):
        return list(encoder.stage_channels)
    info = getattr(encoder, "feature_info", None)
    if info is not None and hasattr(info, "channels"):
        return list(info.channels())
    raise ConfigError(
        f"cannot tell the feature channels of a {type(encoder).__name__}: expected a "
        "SwinV2Encoder (forward_pyramid) or a timm features_only model; pass decoder= explicitly"
    )


def _input_affine(mode: str) -> tuple[list[float], list[float]]:
    """(scale, shift) per channel turning a spec-1.5 image into the encoder's input convention."""
    if mode == "reference":
        return [1.0] * 3, [0.0] * 3
    # x_raw = std_ref x + mean_ref in [0, 1] (spec 9.5), then the encoder's own normalisation.
    if mode == "unit":
        return list(SC_DEPTH_STD), list(SC_DEPTH_MEAN)
    if mode == "imagenet":
        scale = [s / d for s, d in zip(SC_DEPTH_STD, IMAGENET_STD, strict=True)]
        shift = [
            (m - mi) / d
            for m, mi, d in zip(SC_DEPTH_MEAN, IMAGENET_MEAN, IMAGENET_STD, strict=True)
        ]
        return scale, shift
    raise ConfigError(
        f"input_norm: expected 'auto', 'reference', 'imagenet' or 'unit', got {mode!r}"
    )


class DepthNet(nn.Module):
    """Encoder + :class:`DispNetDecoder`: image (B, 3, H, W) normalised as spec 1.5 -> depth (B, 1, H, W).

    H and W must be divisible by 32 and at least 64 (and equal the Swin encoder's ``img_size`` when it enforces
    one). Depth lies in (1/10.01, 100) = (0.0999, 100), unit-free (scale-ambiguous).

    ``encoder``: a :class:`~mesadepth.models.backbone.SwinV2Encoder` (features via
    ``forward_pyramid``, strides 4..32) or a timm ``features_only`` ResNet (five maps, strides
    2..32, the reference). ``decoder``: built from the encoder's channels when ``None``, with
    ``skip_norm`` (default: on for Swin, off otherwise), ``stem_channels``, ``coarse_heads``,
    ``num_ch_dec`` and ``padding`` (module docstring); these options are refused when a decoder
    is given.

    ``input_norm`` (spec 9.5) converts the spec-1.5 image before the encoder: ``reference``
    passes it through (the reference's ResNet, needed for released checkpoints);
    ``imagenet`` maps it to ImageNet mean/std (what SimMIM pre-trained the Swin encoder on);
    ``unit`` to [0, 1] RGB (the fine-tuning recipe's convention); ``auto`` = ``imagenet`` for
    Swin, ``reference`` otherwise. The stem sees the converted image too. The conversion has
    no parameters and is not in the state dict: record ``depth_net.config`` with a run.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: DispNetDecoder | None = None,
        *,
        input_norm: InputNorm = "auto",
        skip_norm: bool | None = None,
        stem_channels: int = 0,
        coarse_heads: bool = True,
        num_ch_dec: Sequence[int] = NUM_CH_DEC,
        padding: Padding = "reflect",
    ) -> None:
        super().__init__()
        self.pyramid = hasattr(encoder, "forward_pyramid")
        if decoder is None:
            decoder = DispNetDecoder(
                encoder_channels(encoder),
                num_ch_dec,
                stem_channels=stem_channels,
                skip_norm=self.pyramid if skip_norm is None else bool(skip_norm),
                coarse_heads=coarse_heads,
                padding=padding,
            )
        elif (
            skip_norm is not None
            or stem_channels
            or not coarse_heads
            or tuple(num_ch_dec) != NUM_CH_DEC
            or padding != "reflect"
        ):
            raise ConfigError(
                "DepthNet: skip_norm / stem_channels / coarse_heads / num_ch_dec / padding "
                "configure the decoder DepthNet builds; they cannot be combined with decoder="
            )
        self.encoder = encoder
        self.decoder = decoder
        if input_norm == "auto":
            input_norm = "imagenet" if self.pyramid else "reference"
        scale, shift = _input_affine(input_norm)
        self.input_norm: str = input_norm
        self.register_buffer("in_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        """The choices a state dict does not show: input convention and decoder layout."""
        return {"input_norm": self.input_norm, "decoder": self.decoder.config}

    def encoder_input(self, x: Tensor) -> Tensor:
        """The spec-1.5 image converted to the encoder's convention (``input_norm``)."""
        if self.input_norm == "reference":
            return x
        return x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)

    def features(self, x: Tensor) -> list[Tensor]:
        """Encoder maps, fine to coarse, for an already converted input."""
        if self.pyramid:
            return list(self.encoder.forward_pyramid(x))
        return list(self.encoder(x))

    def disparity(self, x: Tensor) -> Tensor:
        """Disparity (B, 1, H, W) in (0.01, 10.01): 1 / :meth:`forward`."""
        # The stride-32 map must be at least 2 px: reflection padding cannot pad a 1-px map.
        if x.dim() != 4 or x.shape[1] != 3 or any(s % 32 or s < 64 for s in x.shape[-2:]):
            raise ValueError(
                f"DepthNet: expected images (B, 3, H, W) with H and W divisible by 32 and at "
                f"least 64, got {tuple(x.shape)}"
            )
        z = self.encoder_input(x)
        return self.decoder(self.features(z), z)

    def forward(self, x: Tensor) -> Tensor:
        return 1.0 / self.disparity(x)


RESNET_ENCODERS = {f"resnet{n}": n for n in IMAGENET_RESNET_URLS}
DEPTHNET_OPTIONS = (
    "input_norm",
    "skip_norm",
    "stem_channels",
    "coarse_heads",
    "num_ch_dec",
    "padding",
)
"""Keys :func:`build_depthnet` passes to :class:`DepthNet`; every other key configures the encoder."""


def build_resnet_encoder(num_layers: int = 18, pretrained: PathLike | None = None) -> nn.Module:
    """The reference's depth encoder (spec 2.1): timm ResNet ``features_only``, five maps.

    ``pretrained``: a local ImageNet file (:data:`~mesadepth.models.posenet.IMAGENET_RESNET_URLS`);
    ``None`` keeps the random initialisation.
    """
    encoder = create_resnet(num_layers, features_only=True)
    if pretrained is not None:
        load_imagenet_resnet(encoder, pretrained, num_layers)
    return encoder


def build_depthnet(encoder: str | Mapping[str, Any] | nn.Module, **overrides: Any) -> DepthNet:
    """Build a :class:`DepthNet` from an encoder preset, a config mapping or an encoder module.

    ``encoder``: a Swin-v2 preset of :data:`~mesadepth.models.backbone.SWINV2_PRESETS`
    (``"tiny-cpu"``, ``"swinv2_large_window30_480"``, ...), ``"resnet18"`` / ``"resnet50"``
    (also 34, 101, 152), a mapping holding one of these under ``"preset"`` plus arguments, or an
    ``nn.Module``. Keys in :data:`DEPTHNET_OPTIONS` (from ``overrides`` or the mapping) go to
    :class:`DepthNet`; the others to the encoder: :func:`~mesadepth.models.backbone.build_encoder`
    arguments for Swin, ``pretrained`` (local ImageNet file) for ResNet. Examples:
    ``build_depthnet("tiny-cpu")``, ``build_depthnet("resnet18", pretrained="resnet18-f37072fd.pth")``,
    ``build_depthnet("swinv2_large_window12_192", img_size=480, window_size=(30, 30, 30, 15),
    pretrained_window_sizes=(12, 12, 12, 6), stem_channels=64)``.
    """
    if isinstance(encoder, str):
        cfg: dict[str, Any] = {"preset": encoder}
    elif dataclasses.is_dataclass(encoder) and not isinstance(encoder, type):
        cfg = dataclasses.asdict(encoder)
    elif isinstance(encoder, Mapping):
        cfg = dict(encoder)
    elif isinstance(encoder, nn.Module):
        cfg = {}
    else:
        raise ConfigError(
            f"encoder: expected a preset name, a mapping or an nn.Module, got {type(encoder).__name__}"
        )
    cfg.update(overrides)
    net_kw = {k: cfg.pop(k) for k in DEPTHNET_OPTIONS if k in cfg}
    if isinstance(encoder, nn.Module):
        if cfg:
            raise ConfigError(
                f"build_depthnet: encoder arguments {sorted(cfg)} given with an encoder module; "
                f"only {', '.join(DEPTHNET_OPTIONS)} apply"
            )
        return DepthNet(encoder, **net_kw)
    preset = cfg.get("preset")
    if isinstance(preset, str) and preset in RESNET_ENCODERS:
        cfg.pop("preset")
        unknown = sorted(set(cfg) - {"pretrained"})
        if unknown:
            raise ConfigError(
                f"unknown ResNet encoder argument(s) {unknown}; valid: pretrained (local ImageNet "
                f"file), {', '.join(DEPTHNET_OPTIONS)}"
            )
        module = build_resnet_encoder(RESNET_ENCODERS[preset], cfg.get("pretrained"))
        return DepthNet(module, **net_kw)
    if isinstance(preset, str) and preset not in SWINV2_PRESETS:
        raise ConfigError(
            f"unknown DepthNet encoder {preset!r}; expected a Swin-v2 preset "
            f"({', '.join(SWINV2_PRESETS)}) or one of {', '.join(RESNET_ENCODERS)}"
        )
    return DepthNet(build_encoder(cfg), **net_kw)
