"""The Xie et al. 2022 NYUv2 depth head and the encoder + head depth model.

Specification: masked-pretraining-and-finetuning.md sections 2.1 (only the last encoder stage
feeds the head), 2.2 (head layers and initialisation) and pitfalls 11 (no mean/std input
normalisation) and 15 (the head's intermediate width is the encoder's embed dim).

State-dict layout of :class:`DepthModel` (what checkpoints hold):

- ``encoder.*``: the timm-named :class:`~mesadepth.models.backbone.SwinV2Encoder` keys, the same
  prefix the encoder files of :func:`~mesadepth.models.backbone.save_encoder` use;
- ``decoder.*``: the whole head. The reference keeps the last two convolutions outside its
  ``Decoder`` (``last_layer_depth.*``); here they live in the head, so a reference key
  ``decoder.deconv_layers.3.weight`` is ours unchanged, ``decoder.conv_layers.*`` likewise, and
  ``last_layer_depth.N.*`` is ``decoder.last_layer_depth.N.*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mesadepth.errors import ConfigError, DataError

__all__ = [
    "DECONV_CONFIG",
    "DepthModel",
    "XieDepthHead",
    "load_depth_model",
    "official_head_state",
    "save_depth_model",
]

HEAD_PREFIX = "decoder."
_HEAD_META = "depth_head"

DECONV_CONFIG: dict[int, tuple[int, int]] = {4: (1, 0), 3: (1, 1), 2: (0, 0)}
"""Deconvolution kernel -> (padding, output_padding), the reference's table (spec 2.2).

Every entry doubles the spatial size at stride 2."""

_INIT_STD = 0.001


class XieDepthHead(nn.Module):
    """Depth head of Xie et al. 2022 (spec 2.2): deconvs, conv, 4x bilinear, conv-ReLU-conv.

    Layers, for features (B, in_channels, h, w):

    1. ``num_deconv`` x [ConvTranspose2d(k, stride 2, no bias), BatchNorm2d, ReLU] ->
       (B, num_filters[-1], h 2^n, w 2^n) (n = num_deconv; kernel -> padding per
       :data:`DECONV_CONFIG`);
    2. Conv2d(num_filters[-1] -> embed_dim, 3, padding 1, bias), BatchNorm2d, ReLU;
    3. bilinear upsampling x2 (align_corners False), twice;
    4. ``last_layer_depth``: Conv2d(embed_dim -> embed_dim, 3), ReLU, Conv2d(embed_dim -> 1, 3);
    5. depth = sigmoid(.) x max_depth, metres in (0, max_depth).

    With the default three deconvolutions the output is 32x the input map, i.e. the encoder's
    input size. Initialisation (spec 2.2): conv and deconv weights N(0, 0.001^2), conv biases 0,
    BatchNorm (1, 0), BatchNorm eps/momentum PyTorch defaults; the initial prediction is hence
    ~max_depth / 2 everywhere.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        num_deconv: int = 3,
        num_filters: Sequence[int] = (32, 32, 32),
        deconv_kernels: Sequence[int] = (2, 2, 2),
        max_depth: float = 10.0,
    ) -> None:
        super().__init__()
        num_filters = tuple(int(f) for f in num_filters)
        deconv_kernels = tuple(int(k) for k in deconv_kernels)
        if num_deconv < 1 or len(num_filters) < num_deconv or len(deconv_kernels) < num_deconv:
            raise ConfigError(
                f"depth head: need num_deconv >= 1 and at least num_deconv entries in "
                f"num_filters and deconv_kernels, got num_deconv={num_deconv}, "
                f"num_filters={num_filters}, deconv_kernels={deconv_kernels}"
            )
        bad = [k for k in deconv_kernels[:num_deconv] if k not in DECONV_CONFIG]
        if bad:
            raise ConfigError(
                f"depth head: deconv kernel(s) {bad} not supported; choose from "
                f"{sorted(DECONV_CONFIG)}"
            )
        if not max_depth > 0:
            raise ConfigError(f"depth head: max_depth must be > 0, got {max_depth!r}")
        self.in_channels = int(in_channels)
        self.embed_dim = int(embed_dim)
        self.max_depth = float(max_depth)
        # What save_depth_model records so load_depth_model rebuilds the same head.
        self.config = {
            "in_channels": self.in_channels,
            "embed_dim": self.embed_dim,
            "num_deconv": int(num_deconv),
            "num_filters": list(num_filters[:num_deconv]),
            "deconv_kernels": list(deconv_kernels[:num_deconv]),
            "max_depth": self.max_depth,
        }

        layers: list[nn.Module] = []
        planes_in = self.in_channels
        for i in range(num_deconv):
            kernel = deconv_kernels[i]
            padding, output_padding = DECONV_CONFIG[kernel]
            layers += [
                nn.ConvTranspose2d(
                    planes_in,
                    num_filters[i],
                    kernel_size=kernel,
                    stride=2,
                    padding=padding,
                    output_padding=output_padding,
                    bias=False,
                ),
                nn.BatchNorm2d(num_filters[i]),
                nn.ReLU(inplace=True),
            ]
            planes_in = num_filters[i]
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(
            nn.Conv2d(planes_in, self.embed_dim, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(self.embed_dim),
            nn.ReLU(inplace=True),
        )
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.last_layer_depth = nn.Sequential(
            nn.Conv2d(self.embed_dim, self.embed_dim, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(self.embed_dim, 1, kernel_size=3, stride=1, padding=1),
        )
        self.init_weights()

    @property
    def stride(self) -> int:
        """Output size / input size: 2^num_deconv deconvolutions x 4 (the two upsamplings)."""
        n_deconv = sum(isinstance(m, nn.ConvTranspose2d) for m in self.deconv_layers)
        return 2**n_deconv * 4

    def init_weights(self) -> None:
        """Spec 2.2 initialisation (the reference's ``normal_init`` / ``constant_init``)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, mean=0.0, std=_INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, in_channels, h, w) -> depth (B, 1, stride h, stride w) in metres."""
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"depth head: expected features (B, {self.in_channels}, h, w), got "
                f"{tuple(features.shape)}"
            )
        out = self.conv_layers(self.deconv_layers(features))
        out = self.up(self.up(out))
        return torch.sigmoid(self.last_layer_depth(out)) * self.max_depth


class DepthModel(nn.Module):
    """Swin-v2 encoder + depth head (spec 2.1, 2.2): RGB in [0, 1] -> depth in metres.

    ``encoder`` must provide ``forward_features_masked(x)`` -> (B, C, H/32, W/32) after its final
    norm (:class:`~mesadepth.models.backbone.SwinV2Encoder`); only that last stage feeds the
    head. The head is registered as ``decoder`` (see the module docstring for the key layout).
    """

    def __init__(self, encoder: nn.Module, head: XieDepthHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = head

    @classmethod
    def from_encoder(cls, encoder: nn.Module, **head_kwargs: object) -> DepthModel:
        """Encoder + a :class:`XieDepthHead` sized from it: in = ``num_features`` (8 C0), width =
        ``embed_dim`` (C0; 192 for L, 128 for B, spec pitfall 15). ``head_kwargs`` go to the head.
        """
        head = XieDepthHead(int(encoder.num_features), int(encoder.embed_dim), **head_kwargs)  # type: ignore[arg-type]
        return cls(encoder, head)

    @property
    def head(self) -> XieDepthHead:
        """The depth head (stored as ``decoder`` for the reference's key names)."""
        return self.decoder

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) RGB in [0, 1] -> depth (B, 1, H, W) metres.

        The input is used as is: the fine-tuning protocol feeds [0, 1] RGB without ImageNet
        mean/std normalisation (spec pitfall 11), although SimMIM pre-training normalised.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"depth model: expected images (B, 3, H, W), got {tuple(x.shape)}")
        return self.decoder(self.encoder.forward_features_masked(x))


def save_depth_model(
    model: DepthModel, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a :class:`DepthModel` as safetensors: ``encoder.*`` + ``decoder.*`` (atomic).

    The metadata holds the encoder config, the head config (``depth_head``) and ``metadata``, so
    :func:`load_depth_model` rebuilds the model from the file alone. This is the
    ``model.safetensors`` of a fine-tuning run; its ``encoder.*`` part is an ordinary encoder
    file that any stage or ``mesadepth cka`` reads.
    """
    from mesadepth.models.backbone import save_encoder

    head = {HEAD_PREFIX + k: v for k, v in model.decoder.state_dict().items()}
    meta = {**dict(metadata or {}), _HEAD_META: model.decoder.config}
    return save_encoder(model.encoder, path, extra=head, metadata=meta)  # type: ignore[arg-type]


def load_depth_model(
    path: str | os.PathLike[str], encoder_overrides: Mapping[str, Any] | None = None
) -> DepthModel:
    """Rebuild and load a depth model written by :func:`save_depth_model` (strict keys/shapes).

    ``encoder_overrides`` (e.g. ``img_size``, ``window_size``) open the weights in another input
    geometry, as :func:`~mesadepth.models.backbone.load_encoder` allows. A file without a head
    (an encoder-only file of a pre-training stage) is a :class:`DataError` saying so.
    """
    from mesadepth.models.backbone import load_encoder, load_tensors, read_metadata

    meta = read_metadata(path)
    head_cfg = meta.get(_HEAD_META)
    if not isinstance(head_cfg, dict):
        raise DataError(
            path,
            f"no depth head config (metadata {_HEAD_META!r}): this is not a fine-tuned depth model "
            "(pre-training stages write encoder files; fine-tune one with `mesadepth finetune`)",
        )
    encoder = load_encoder(path, overrides=encoder_overrides)
    model = DepthModel(encoder, XieDepthHead(**head_cfg))
    state = load_tensors(path, HEAD_PREFIX)
    try:
        result = model.decoder.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise DataError(path, f"decoder.* shapes do not match the head config: {err}") from err
    bad = [*result.missing_keys, *result.unexpected_keys]
    if bad:
        raise DataError(
            path,
            f"decoder.* keys do not match the head config {head_cfg}: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
        )
    return model


# ---------------------------------------------------------------------------------------------
# Official MIM-Depth-Estimation (GLPDepth-style) depth models. (Appended section: its imports are
# local so the module's import block stays as it was.)

_LAST_LAYER = "last_layer_depth."


def _official_head_state(
    state: Mapping[str, Tensor], path: str | os.PathLike[str]
) -> dict[str, tuple[Tensor, str]]:
    """Head tensors of an official depth model under :class:`XieDepthHead` keys.

    Returns ``{head key: (tensor, key as the file spells it)}``: ``decoder.X`` -> ``X``, and the
    reference's ``last_layer_depth.*`` (outside its Decoder) moves into the head unchanged. A file
    in this project's layout (``decoder.last_layer_depth.*``) reads the same way.
    """
    out: dict[str, tuple[Tensor, str]] = {}
    for key, value in state.items():
        if key.startswith(HEAD_PREFIX):
            ours = key[len(HEAD_PREFIX) :]
        elif key.startswith(_LAST_LAYER):
            ours = key
        else:
            continue
        if ours in out:
            raise DataError(
                path,
                f"both {out[ours][1]!r} and {key!r} map to the head key {ours!r}; expected one",
            )
        out[ours] = (value, key)
    return out


def _head_config_from_shapes(
    head: Mapping[str, tuple[Tensor, str]], max_depth: float, path: str | os.PathLike[str]
) -> dict[str, Any]:
    """:class:`XieDepthHead` arguments read off the tensor shapes (spec 2.2 layout).

    ConvTranspose2d weights (in, out, k, k) sit at ``deconv_layers.{3i}.weight``: the first
    ``in`` is the encoder's feature width, each ``out`` a filter count, each ``k`` a kernel;
    ``conv_layers.0.weight`` is (embed_dim, filters, 3, 3). ``max_depth`` is not in the weights
    (the reference passes ``--max_depth`` on the command line: 10 m for NYUv2).
    """
    import re

    pattern = re.compile(r"^deconv_layers\.(\d+)\.weight$")
    deconvs = sorted(
        (int(m.group(1)), t)
        for k, (t, _) in head.items()
        if (m := pattern.match(k)) is not None and t.dim() == 4
    )
    conv = head.get("conv_layers.0.weight")
    if not deconvs or conv is None or conv[0].dim() != 4:
        raise DataError(
            path,
            "cannot size the depth head: expected decoder.deconv_layers.0.weight "
            "(ConvTranspose2d) and decoder.conv_layers.0.weight (Conv2d); head keys found: "
            f"{', '.join(sorted(v[1] for v in head.values())[:6]) or 'none'}",
        )
    if any(w.shape[2] != w.shape[3] for _, w in deconvs):
        raise DataError(path, "the head has a non-square deconvolution kernel; expected k x k")
    return {
        "in_channels": int(deconvs[0][1].shape[0]),
        "embed_dim": int(conv[0].shape[0]),
        "num_deconv": len(deconvs),
        "num_filters": [int(w.shape[1]) for _, w in deconvs],
        "deconv_kernels": [int(w.shape[2]) for _, w in deconvs],
        "max_depth": float(max_depth),
    }


def load_official_depth_model(
    path: str | os.PathLike[str],
    encoder: str | Mapping[str, Any] = "swinv2_large_window30_480",
    encoder_overrides: Mapping[str, Any] | None = None,
    max_depth: float = 10.0,
) -> DepthModel:
    """A whole MIM-Depth-Estimation depth model (``.pth``) as a :class:`DepthModel`, loaded strictly.

    The file (read without executing pickled code) holds the reference ``GLPDepth`` state dict,
    optionally inside ``model`` / ``state_dict`` / ``module`` (training files, spec pitfall 24)
    and with DataParallel's ``module.`` prefix: ``encoder.*`` in the reference Swin-v2 naming,
    ``decoder.deconv_layers.*``, ``decoder.conv_layers.*`` and ``last_layer_depth.{0,2}.*``.

    - Encoder: built from ``encoder`` (preset name or config mapping; default the paper's
      Swin-v2-L at 480 px, windows (30, 30, 30, 15), pretrained windows (12, 12, 12, 6), LayerNorm
      eps 1e-6, spec 2.1) with ``encoder_overrides``, and filled by
      :func:`~mesadepth.models.backbone.load_official_checkpoint` (spec 3.2: patch merging moves
      to the next stage, ``rpe_mlp`` -> ``cpb_mlp``, ``norm3`` -> ``norm``, window buffers
      recomputed for the target windows; strict otherwise).
    - Head: sized from the tensor shapes, ``max_depth`` from the argument (metres), strict.

    Keys outside encoder/decoder/last_layer_depth, and missing, unexpected or mis-shaped keys,
    raise :class:`DataError` naming the first few. The file is read twice (head here, encoder in
    the backbone importer), one copy held at a time.
    """
    from mesadepth.errors import MissingFileError
    from mesadepth.models.backbone import (
        ENCODER_PREFIX,
        SWINV2_PRESETS,
        build_encoder,
        load_official_checkpoint,
        read_state_file,
        unwrap_state_dict,
    )

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            path,
            "depth model checkpoint",
            "a fine-tuned run's model.safetensors, or an official MIM-Depth-Estimation .pth such "
            "as the NYUv2 Swin-v2-L model linked from that repository's README",
        )
    if not max_depth > 0:
        raise ConfigError(f"max_depth must be > 0 metres, got {max_depth!r}")
    state = unwrap_state_dict(read_state_file(path), path)
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if not any(k.startswith(ENCODER_PREFIX) for k in state):
        if any(k.startswith("model." + ENCODER_PREFIX) for k in state):
            raise DataError(
                path,
                "a Lightning training checkpoint (model.encoder.* keys): evaluate the run's "
                "model.safetensors, which `mesadepth finetune` exports beside checkpoints/",
            )
        raise DataError(
            path,
            "no encoder.* keys, so not a whole depth model (an encoder-only Swin-v2 / SimMIM "
            "checkpoint is fine-tuned first: mesadepth finetune init=FILE); keys found: "
            f"{', '.join(sorted(state)[:4])}",
        )
    stray = sorted(k for k in state if not k.startswith((ENCODER_PREFIX, HEAD_PREFIX, _LAST_LAYER)))
    if stray:
        raise DataError(
            path,
            f"{len(stray)} unexpected key(s) outside encoder.* / decoder.* / last_layer_depth.*: "
            f"{', '.join(stray[:5])}",
        )
    head_state = _official_head_state(state, path)
    del state  # the encoder importer reads the file again; hold one copy at a time
    if not head_state:
        raise DataError(
            path,
            "no decoder.* / last_layer_depth.* keys: an encoder checkpoint, not a depth model "
            "(fine-tune it first: mesadepth finetune init=FILE)",
        )
    head_cfg = _head_config_from_shapes(head_state, max_depth, path)

    cfg: dict[str, Any] = {"preset": encoder} if isinstance(encoder, str) else dict(encoder)
    cfg.update(encoder_overrides or {})
    # The feature width is known before building (Swin-v2-L takes seconds to initialise), so a
    # head / encoder mismatch fails fast: width = embed_dim x 2^(stages - 1).
    resolved = {**SWINV2_PRESETS.get(cfg.get("preset", ""), {}), **cfg}
    if "embed_dim" in resolved and "depths" in resolved:
        width = int(resolved["embed_dim"]) * 2 ** (len(resolved["depths"]) - 1)
    else:
        width = None
    if width is None or width == head_cfg["in_channels"]:
        enc = build_encoder(cfg)
        width = int(enc.num_features)
    if width != head_cfg["in_channels"]:
        raise DataError(
            path,
            f"the head takes {head_cfg['in_channels']}-channel features but encoder {encoder!r} "
            f"gives {width}: choose the matching preset (1536 = Swin-v2-L, 1024 = Swin-v2-B)",
        )
    try:
        load_official_checkpoint(path, enc, strict=True)
    except DataError as err:
        raise DataError(path, f"encoder.* part: {err.problem}") from None

    try:
        head = XieDepthHead(**head_cfg)
    except ConfigError as err:
        raise DataError(path, f"unsupported depth head {head_cfg}: {err}") from None
    expected = head.state_dict()
    missing = [
        k if k.startswith(_LAST_LAYER) else HEAD_PREFIX + k for k in expected if k not in head_state
    ]
    unexpected = [v[1] for k, v in head_state.items() if k not in expected]
    shapes = [
        f"{head_state[k][1]} (file {tuple(head_state[k][0].shape)}, model {tuple(t.shape)})"
        for k, t in expected.items()
        if k in head_state and tuple(head_state[k][0].shape) != tuple(t.shape)
    ]
    problems = [
        f"{len(keys)} {label} key(s): {', '.join(keys[:5])}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape-mismatched", shapes),
        )
        if keys
    ]
    if problems:
        raise DataError(path, f"depth head {head_cfg} does not match: " + "; ".join(problems))
    head.load_state_dict({k: v[0] for k, v in head_state.items()}, strict=True)
    return DepthModel(enc, head)


def official_head_state(head: XieDepthHead) -> dict[str, Tensor]:
    """The head's weights under the reference ``GLPDepth`` names: exact inverse of the import.

    ``deconv_layers.*`` / ``conv_layers.*`` -> ``decoder.deconv_layers.*`` /
    ``decoder.conv_layers.*`` (the reference ``Decoder``); ``last_layer_depth.*`` stays at the
    top level, where ``GLPDepth`` registers it. BatchNorm running statistics and
    ``num_batches_tracked`` included; detached CPU copies in the reference's order.
    """
    out: dict[str, Tensor] = {}
    for key, value in head.state_dict().items():
        name = key if key.startswith(_LAST_LAYER) else HEAD_PREFIX + key
        out[name] = value.detach().cpu().clone().contiguous()
    return out
