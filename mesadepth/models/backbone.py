"""The one Swin-v2 encoder every stage shares: mask token, feature pyramid, layer taps, weights I/O.

:class:`SwinV2Encoder` is timm's ``SwinTransformerV2`` with a SimMIM mask token (spec
masked-pretraining-and-finetuning.md section 1.2), so its state-dict keys are timm-native
(``layers.0.blocks.0.attn.qkv.weight`` ... ``norm.weight``) plus ``mask_token``. Between stages
the encoder travels as one safetensors file whose keys are ``encoder.<timm key>``
(:func:`save_encoder` / :func:`load_encoder`, shared/DESIGN.md); the file's metadata holds the
constructor config so a file can be opened without being told its architecture.
Official Swin-v2 / SimMIM / depth-repository ``.pth`` files are imported by
:func:`load_official_checkpoint` (spec section 3.3) and written back by
:func:`official_encoder_state` (``mesadepth export``). The nine CKA layers of spec section 3.1 are
:data:`PAPER_LAYERS`, captured with :func:`tap`.

LayerNorm eps defaults to 1e-6, the value of the depth repository's fine-tuning encoder (spec
2.1, 3.1 verification note: bit-exact parity with it needs 1e-6); the ``*_window30_480``
presets keep it. Official Swin-v2 / SimMIM pre-training uses timm's 1e-5 (spec pitfall 16), and
so do the ``*_window12_192`` presets named after that geometry; elsewhere pass
``layer_norm_eps=1e-5`` when exact parity with those checkpoints matters. The eps is part of
the saved config, so a file always reopens with the eps it was trained with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import Tensor, nn

from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.io import atomic_path, safe_torch_load

__all__ = [
    "PAPER_LAYERS",
    "REFERENCE_LAYERS",
    "REFERENCE_TO_TIMM",
    "SWINV2_PRESETS",
    "META_CONFIG",
    "META_FORMAT",
    "ImportReport",
    "SwinV2Encoder",
    "build_encoder",
    "load_encoder",
    "load_official_checkpoint",
    "load_tensors",
    "official_encoder_state",
    "paper_layers",
    "import_official_state",
    "read_metadata",
    "read_official_state",
    "read_safetensors_header",
    "read_state_file",
    "reference_geometry",
    "resolve_layer",
    "resolve_layers",
    "save_encoder",
    "tap",
    "trained_window_sizes",
    "unwrap_state_dict",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
WindowSpec = int | Sequence[int] | Sequence[int | Sequence[int]]
NoDecayRule = Literal["reference", "intended", "finetune"]

ENCODER_PREFIX = "encoder."
META_FORMAT = "mesadepth.format"
META_CONFIG = "mesadepth.encoder_config"
_META_USER = "mesadepth.metadata"
_FORMAT_VERSION = "encoder/1"


# ---------------------------------------------------------------------------------------------
# The encoder.


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"{what}: expected an int or (height, width), got {value!r}")


def _per_stage(value: Any, num_stages: int, what: str) -> tuple[tuple[int, int], ...]:
    """Expand an int, an (h, w) pair or one entry per stage into one (h, w) per stage."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value, value),) * num_stages
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(f"{what}: expected an int or one entry per stage, got {value!r}")
    # An (h, w) pair of ints is one window for every stage, unless there are exactly two stages
    # and the caller clearly meant per stage; with four stages (every Swin-v2) this never clashes.
    if len(value) == 2 and num_stages != 2 and all(isinstance(v, int) for v in value):
        return (_pair(value, what),) * num_stages
    if len(value) != num_stages:
        raise ConfigError(f"{what}: expected {num_stages} entries (one per stage), got {value!r}")
    return tuple(_pair(v, f"{what}[{i}]") for i, v in enumerate(value))


def trained_window_sizes(cfg: Mapping[str, Any]) -> list[list[int]]:
    """The per-stage windows an encoder config was trained with, as its position bias saw them.

    Non-zero ``pretrained_window_sizes`` are kept (a file that was itself re-windowed);
    otherwise each stage's window clipped to its token map (timm's rule), e.g. 192 px, patch 4,
    window 12 -> (12, 12, 12, 6) (geometric spec 9.4, fine-tuning pitfall 9).
    """
    n = len(cfg["depths"])
    pretrained = _per_stage(cfg.get("pretrained_window_sizes", 0), n, "pretrained_window_sizes")
    if any(h > 0 for h, _ in pretrained):
        return [list(p) for p in pretrained]
    img = _pair(cfg["img_size"], "img_size")
    patch = int(cfg.get("patch_size", 4))
    out = []
    for s, (wh, ww) in enumerate(_per_stage(cfg["window_size"], n, "window_size")):
        out.append([min(wh, img[0] // patch // 2**s), min(ww, img[1] // patch // 2**s)])
    return out


def _jsonable_stages(stages: tuple[tuple[int, int], ...]) -> list[Any]:
    # Square windows are written as plain ints so the saved config stays readable.
    return [s[0] if s[0] == s[1] else list(s) for s in stages]


class SwinV2Encoder(SwinTransformerV2):
    """timm Swin-v2 with a SimMIM mask token (spec 1.2), a feature pyramid and a saved config.

    Keys are timm's plus ``mask_token`` (1, 1, embed_dim), truncated-normal std 0.02. Built
    with ``num_classes=0`` (no head parameters). Window sizes and ``pretrained_window_sizes``
    are per stage (spec 2.1, 2.7): when fine-tuning at a window other than the pre-training one,
    pass the pre-training windows, e.g. (12, 12, 12, 6) for weights pre-trained at 192 px with
    window 12 (spec pitfall 10: the default zeros give wrong position biases without error).
    timm clips a window to the stage's token map when the map is not larger, and then disables
    the shift (spec 1.2).

    ``img_size`` may be an int or (height, width); with ``strict_img_size=True`` (timm's
    default) inputs must have exactly that size.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 192,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: WindowSpec = 12,
        pretrained_window_sizes: WindowSpec | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        strict_img_size: bool = True,
    ) -> None:
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        n = len(depths)
        if n == 0 or len(num_heads) != n:
            raise ConfigError(
                f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length"
            )
        for i, h in enumerate(num_heads):
            dim = embed_dim * 2**i
            if h <= 0 or dim % h:
                raise ConfigError(
                    f"num_heads[{i}]={h} must divide the stage-{i} width {dim} (embed_dim {embed_dim} x 2^{i})"
                )
        img = _pair(img_size, "img_size")
        windows = _per_stage(window_size, n, "window_size")
        if any(w <= 0 for ws in windows for w in ws):
            raise ConfigError(f"window_size must be positive, got {window_size!r}")
        pretrained = _per_stage(
            0 if pretrained_window_sizes is None else pretrained_window_sizes,
            n,
            "pretrained_window_sizes",
        )
        if any(w < 0 for ws in pretrained for w in ws):
            raise ConfigError(
                f"pretrained_window_sizes must be >= 0, got {pretrained_window_sizes!r}"
            )
        if not layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {layer_norm_eps!r}")

        super().__init__(
            img_size=img,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=windows,
            strict_img_size=strict_img_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
            pretrained_window_sizes=pretrained,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_mask_token()
        self._config: dict[str, Any] = {
            "img_size": list(img),
            "patch_size": int(patch_size),
            "in_chans": int(in_chans),
            "embed_dim": int(embed_dim),
            "depths": list(depths),
            "num_heads": list(num_heads),
            "window_size": _jsonable_stages(windows),
            "pretrained_window_sizes": _jsonable_stages(pretrained),
            "mlp_ratio": float(mlp_ratio),
            "qkv_bias": bool(qkv_bias),
            "drop_path_rate": float(drop_path_rate),
            "attn_drop_rate": float(attn_drop_rate),
            "proj_drop_rate": float(proj_drop_rate),
            "layer_norm_eps": float(layer_norm_eps),
            "strict_img_size": bool(strict_img_size),
        }

    # -- construction helpers -------------------------------------------------------------------

    def _init_mask_token(self) -> None:
        # Spec 1.2: bounds are the absolute values +-2, i.e. effectively untruncated at std 0.02.
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)

    def init_weights(self, needs_reset: bool = True) -> None:
        """timm's initialisation, plus the mask token (absent while timm's __init__ runs)."""
        super().init_weights(needs_reset=needs_reset)
        if getattr(self, "mask_token", None) is not None:
            self._init_mask_token()

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``SwinV2Encoder(**enc.config)`` rebuilds it."""
        return json.loads(json.dumps(self._config))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (Ht, Wt) after patch embedding, the shape a mask must have per image."""
        return tuple(self.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the four stage outputs (strides 4, 8, 16, 32)."""
        return [int(self.embed_dim * 2**i) for i in range(self.num_layers)]

    def set_input_size(
        self,
        img_size: Any = None,
        patch_size: Any = None,
        window_size: Any = None,
        window_ratio: Any = None,
        always_partition: bool | None = None,
    ) -> None:
        """timm's resize; also updates the saved config so exports reopen at the new geometry."""
        super().set_input_size(
            img_size=img_size,
            patch_size=patch_size,
            window_size=window_size,
            window_ratio=window_ratio,
            always_partition=always_partition,
        )
        # timm records the per-stage windows it just applied (scaled with the grid when no window
        # was given); rebuilding with them and the new size reproduces this geometry.
        applied = getattr(self, "_model_args", {}).get("window_size", self._ref_window_sizes)
        self._config["img_size"] = list(self.patch_embed.img_size)
        self._config["patch_size"] = int(self.patch_embed.patch_size[0])
        self._config["window_size"] = _jsonable_stages(tuple(tuple(w) for w in applied))

    @torch.jit.ignore
    def no_weight_decay(self, rule: NoDecayRule = "reference") -> set[str]:
        """Names of the parameters that get no weight decay under ``rule`` (spec 1.6, 2.5).

        The full set (1-D tensors and ``.bias`` names included), so that this list and the
        project's optimizer groups agree exactly, and timm's optimizer factory
        (``create_optimizer_v2``, which reads ``no_weight_decay()`` and adds the 1-D rule) builds
        the same groups as :mod:`mesadepth.optim`:

        - ``"reference"`` (default): SimMIM / Swin-v2 pre-training as the reference runs it
          (spec 1.6; :func:`~mesadepth.optim.param_groups_no_decay`'s default): 1-D tensors,
          ``.bias`` names, ``mask_token`` (and ``absolute_pos_embed`` if present). The Swin-v2
          ``logit_scale`` and ``cpb_mlp`` weights *are* decayed: the reference's keyword rule
          never matches.
        - ``"intended"``: the reference set plus every ``cpb_mlp`` / ``logit_scale`` name, what
          the Swin-v2 code meant and timm's own ``no_weight_decay()`` lists (``rule="intended"``
          of :func:`~mesadepth.optim.param_groups_no_decay`).
        - ``"finetune"``: the depth fine-tuning rule (spec 2.5,
          :func:`~mesadepth.optim.is_no_decay_finetune`): 1-D tensors, ``.bias`` names and
          names containing ``relative_position_bias_table``, ``cpb_mlp``, ``rpe_mlp`` or
          ``logit_scale``; the unused ``mask_token`` is not exempt there.
        """
        from mesadepth.optim import is_no_decay, is_no_decay_finetune

        if rule == "finetune":
            return {n for n, p in self.named_parameters() if is_no_decay_finetune(n, p)}
        if rule not in ("reference", "intended"):
            raise ConfigError(
                f"no_weight_decay: rule must be 'reference', 'intended' or 'finetune', got {rule!r}"
            )
        return {n for n, p in self.named_parameters() if is_no_decay(n, p, rule=rule)}

    # -- forward passes -------------------------------------------------------------------------

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Patch embedding (normalised, NHWC) with SimMIM token replacement (spec 1.2).

        x: (B, in_chans, H, W). mask: (B, Ht, Wt), 1 = masked (any dtype), Ht, Wt = H/4, W/4.
        Returns (B, Ht, Wt, C0): ``t * (1 - m) + mask_token * m``, so unmasked tokens are the
        plain embedding and masked ones exactly the mask token (post-LayerNorm space).
        """
        t = self.patch_embed(x)
        if mask is None:
            return t
        if mask.dim() != 3 or tuple(mask.shape) != tuple(t.shape[:3]):
            raise ValueError(
                f"mask: expected shape (B, Ht, Wt) = {tuple(t.shape[:3])} (one value per "
                f"{self.patch_embed.patch_size} patch token, 1 = masked), got {tuple(mask.shape)}"
            )
        m = mask.to(dtype=t.dtype).unsqueeze(-1)
        return t * (1 - m) + self.mask_token.to(t.dtype) * m

    def forward_features_masked(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """SimMIM encoder forward (spec 1.2): embed + mask -> stages -> ``norm``.

        x: (B, in_chans, H, W); mask: (B, H/4, W/4) or None. Returns NCHW (B, 8*C0, H/32, W/32),
        the input of the SimMIM decoder and of the depth head. ``mask=None`` equals timm's
        ``forward_features`` (permuted to NCHW).
        """
        z = self.layers(self.embed(x, mask))
        return self.norm(z).permute(0, 3, 1, 2).contiguous()

    def forward_pyramid(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Four stage outputs as NCHW at strides 4, 8, 16, 32, for dense decoders.

        Channels C0, 2C0, 4C0, 8C0. Stages 0-2 are the raw residual stream after the stage's
        last block (no norm: Swin-v2 blocks are res-post-norm, so decoders wanting normalised
        skips add their own LayerNorm). Stage 3 is after the final ``norm``, i.e. the last map
        equals :meth:`forward_features_masked`.
        """
        z = self.embed(x, mask)
        feats = []
        last = len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            z = stage(z)
            out = self.norm(z) if i == last else z
            feats.append(out.permute(0, 3, 1, 2).contiguous())
        return feats


# ---------------------------------------------------------------------------------------------
# Presets and the factory.

_LARGE = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}
_BASE = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}
_FT480 = {
    "img_size": 480,
    # Spec 2.1: stages 2 and 3 are one window each at 480 (30 and 15 tokens); the
    # pre-training windows at 192 px were 12, 12, 12, 6 (stage 3 clipped, spec pitfall 9).
    "window_size": (30, 30, 30, 15),
    "pretrained_window_sizes": (12, 12, 12, 6),
}

SWINV2_PRESETS: dict[str, dict[str, Any]] = {
    # Demo / tests on CPU: 0.37 M parameters, 64 px, token maps 16, 8, 4, 2.
    "tiny-cpu": {
        "img_size": 64,
        "embed_dim": 16,
        "depths": (1, 1, 2, 1),
        "num_heads": (1, 2, 2, 4),
        "window_size": 4,
    },
    # SimMIM pre-training geometry (spec 1.9, 1.10): 192 px, window 12 (12, 12, 12, 6 effective),
    # pretrained windows 0, drop path 0.1 as in the Swin-v2 SimMIM recipe, LayerNorm eps 1e-5 as
    # SimMIM / official Swin-v2 (and timm's model of the same name) build it (spec pitfall 16).
    "swinv2_base_window12_192": {
        **_BASE,
        "img_size": 192,
        "window_size": 12,
        "drop_path_rate": 0.1,
        "layer_norm_eps": 1e-5,
    },
    "swinv2_large_window12_192": {
        **_LARGE,
        "img_size": 192,
        "window_size": 12,
        "drop_path_rate": 0.1,
        "layer_norm_eps": 1e-5,
    },
    # NYUv2 fine-tuning geometry (spec 2.1): drop path 0.5 for L, 0.3 for B; eps 1e-6 (the
    # constructor default), the depth repository's encoder.
    "swinv2_large_window30_480": {**_LARGE, **_FT480, "drop_path_rate": 0.5},
    "swinv2_base_window30_480": {**_BASE, **_FT480, "drop_path_rate": 0.3},
}

_ENCODER_ARGS = tuple(
    p for p in inspect.signature(SwinV2Encoder.__init__).parameters if p != "self"
)


def _closest(word: str, options: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return ", ".join(close) if close else "(none close)"


def build_encoder(name_or_cfg: str | Mapping[str, Any] | Any, **overrides: Any) -> SwinV2Encoder:
    """Build a :class:`SwinV2Encoder` from a preset name, a config mapping or a dataclass.

    A mapping (or dataclass) holds constructor arguments and may name a base preset under
    ``"preset"``; ``overrides`` win over both. E.g. the 480 px fine-tuning encoder from a
    192 px pre-training preset: ``build_encoder("swinv2_large_window12_192", img_size=480,
    window_size=(30, 30, 30, 15), pretrained_window_sizes=(12, 12, 12, 6), drop_path_rate=0.5,
    layer_norm_eps=1e-6)`` (the preset's eps is SimMIM's 1e-5; the depth repository's is 1e-6).
    Unknown preset or argument names raise :class:`ConfigError` listing close valid names.
    """
    if isinstance(name_or_cfg, str):
        cfg: dict[str, Any] = {"preset": name_or_cfg}
    elif dataclasses.is_dataclass(name_or_cfg) and not isinstance(name_or_cfg, type):
        cfg = dataclasses.asdict(name_or_cfg)
    elif isinstance(name_or_cfg, Mapping):
        cfg = dict(name_or_cfg)
    else:
        raise ConfigError(
            f"encoder: expected a preset name, a mapping or a dataclass, got {type(name_or_cfg).__name__}"
        )
    cfg.update(overrides)
    preset = cfg.pop("preset", None)
    if preset is not None:
        if preset not in SWINV2_PRESETS:
            raise ConfigError(
                f"unknown encoder preset {preset!r}; close: {_closest(preset, list(SWINV2_PRESETS))}; "
                f"all: {', '.join(SWINV2_PRESETS)}"
            )
        cfg = {**SWINV2_PRESETS[preset], **cfg}
    unknown = [k for k in cfg if k not in _ENCODER_ARGS]
    if unknown:
        hints = "; ".join(f"{k!r} (close: {_closest(k, _ENCODER_ARGS)})" for k in unknown)
        raise ConfigError(
            f"unknown encoder argument(s) {hints}; valid arguments: {', '.join(_ENCODER_ARGS)}"
        )
    return SwinV2Encoder(**cfg)


# ---------------------------------------------------------------------------------------------
# Named layers (spec 3.1) and taps.

PAPER_LAYERS: tuple[str, ...] = (
    "layers.1.downsample.norm",
    "layers.2.downsample.norm",
    "layers.2.blocks.3.norm1",
    "layers.2.blocks.6.norm1",
    "layers.2.blocks.9.norm1",
    "layers.2.blocks.12.norm1",
    "layers.2.blocks.15.norm1",
    "layers.3.downsample.norm",
    "norm",
)
"""The nine CKA layers of spec 3.1 in timm naming, in order (layer index 0..8)."""

REFERENCE_LAYERS: tuple[str, ...] = (
    "layers.0.downsample.norm",
    "layers.1.downsample.norm",
    "layers.2.blocks.3.norm1",
    "layers.2.blocks.6.norm1",
    "layers.2.blocks.9.norm1",
    "layers.2.blocks.12.norm1",
    "layers.2.blocks.15.norm1",
    "layers.2.downsample.norm",
    "norm3",
)
"""The same nine layers in the depth repository's / official naming."""

REFERENCE_TO_TIMM: dict[str, str] = dict(zip(REFERENCE_LAYERS, PAPER_LAYERS, strict=True))
"""Reference name -> timm name for the nine layers (patch merging moves to the next stage)."""

Naming = Literal["auto", "timm", "reference"]

_REF_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample(?=$|\.)")


def _reference_to_timm_name(name: str) -> str:
    """Translate any reference / official module or key name to timm's (spec 3.2)."""
    name = _REF_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample", name)
    if name == "norm3" or name.startswith("norm3."):
        name = "norm" + name[len("norm3") :]
    return name.replace("rpe_mlp", "cpb_mlp")


def _is_reference_only(name: str) -> bool:
    # Names that exist only in the reference layout. layers.1/2.downsample exist in both
    # layouts with different meanings, so they cannot decide the naming on their own.
    return (
        name.startswith("layers.0.downsample.")
        or name == "norm3"
        or name.startswith("norm3.")
        or "rpe_mlp" in name
    )


def paper_layers(encoder: SwinTransformerV2) -> list[str]:
    """The nine paper layers scaled to ``encoder``'s depths (timm names, in order).

    Rule: the three patch-merging norms and the final ``norm`` are kept; the five stage-2 blocks
    3, 6, 9, 12, 15 of 18 become blocks ``floor(k * d / 6 + 0.5)`` for k = 1..5 (the same
    fractions k/6 of stage 2's depth d, rounded half up), clipped to ``d - 1`` and de-duplicated
    in order. Equals :data:`PAPER_LAYERS` for depths (2, 2, 18, 2); a stage-2 depth below 5
    yields fewer than nine layers (e.g. d = 2: blocks 0 and 1, six layers).
    """
    depths = [len(stage.blocks) for stage in encoder.layers]
    if len(depths) != 4:
        raise ConfigError(f"paper layers need a 4-stage Swin-v2 encoder, got depths {depths}")
    d = depths[2]
    blocks: list[int] = []
    for k in range(1, 6):
        b = min(int(math.floor(k * d / 6 + 0.5)), d - 1)
        if b not in blocks:
            blocks.append(b)
    return [
        "layers.1.downsample.norm",
        "layers.2.downsample.norm",
        *(f"layers.2.blocks.{b}.norm1" for b in blocks),
        "layers.3.downsample.norm",
        "norm",
    ]


def _check_module(encoder: nn.Module, name: str, given: str | int) -> None:
    modules = dict(encoder.named_modules())
    if name in modules:
        return
    hint = ""
    if isinstance(given, str) and _reference_to_timm_name(given) in modules:
        hint = f" (in reference naming it is {_reference_to_timm_name(given)!r}: pass naming='reference')"
    raise ConfigError(
        f"layer {given!r} (timm name {name!r}) is not a module of this encoder{hint}; "
        f"close valid names: {_closest(name, [m for m in modules if m])}"
    )


def resolve_layers(
    names: Sequence[str | int],
    encoder: nn.Module | None = None,
    naming: Naming = "auto",
) -> list[str]:
    """Resolve layer names (timm or reference naming) or paper indices 0-8 to timm names.

    ``naming="auto"`` reads the whole list as reference names if any of them exists only in the
    reference layout (``layers.0.downsample.*``, ``norm3``, ``rpe_mlp``), else as timm names:
    ``layers.1.downsample.norm`` means different layers in the two layouts, so a lone ambiguous
    name is taken as timm's; pass ``naming="reference"`` to force the other reading. Ints index
    :func:`paper_layers` of ``encoder`` (:data:`PAPER_LAYERS` without one). With ``encoder``,
    every name is checked to exist, else :class:`ConfigError` lists close valid module names.
    """
    if naming not in ("auto", "timm", "reference"):
        raise ConfigError(f"naming must be 'auto', 'timm' or 'reference', got {naming!r}")
    if naming == "auto":
        ref = any(isinstance(n, str) and _is_reference_only(n) for n in names)
        naming = "reference" if ref else "timm"
    table = paper_layers(encoder) if encoder is not None else list(PAPER_LAYERS)  # type: ignore[arg-type]
    out: list[str] = []
    for given in names:
        if isinstance(given, bool) or not isinstance(given, (int, str)):
            raise ConfigError(f"layer: expected a name or an index, got {given!r}")
        if isinstance(given, int):
            if not -len(table) <= given < len(table):
                raise ConfigError(
                    f"layer index {given} out of range: this encoder has {len(table)} paper layers {table}"
                )
            name = table[given]
        else:
            name = _reference_to_timm_name(given) if naming == "reference" else given
        if encoder is not None:
            _check_module(encoder, name, given)
        out.append(name)
    return out


def resolve_layer(
    name: str | int, encoder: nn.Module | None = None, naming: Naming = "auto"
) -> str:
    """One layer name or paper index -> timm module name (see :func:`resolve_layers`)."""
    return resolve_layers([name], encoder, naming)[0]


@contextlib.contextmanager
def tap(
    encoder: nn.Module,
    names: Sequence[str | int],
    naming: Naming = "auto",
    detach: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Collect the outputs of named modules during forwards run inside the ``with`` block.

    Yields a dict keyed by resolved timm name (in the order given), filled by forward hooks
    with each module's output (timm NHWC, e.g. (B, 24, 24, 2*C0) for ``layers.1.downsample.norm``
    at 192 px); a later forward overwrites an earlier one. The hooks are removed on exit, also
    when the block raises. ``detach=False`` keeps the graph (feature losses).
    """
    resolved = resolve_layers(names, encoder, naming)
    store: dict[str, Tensor] = {}
    handles = []

    def make_hook(key: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            store[key] = output.detach() if detach else output

        return hook

    try:
        for key in dict.fromkeys(resolved):
            handles.append(encoder.get_submodule(key).register_forward_hook(make_hook(key)))
        yield store
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# This project's weights files: safetensors, encoder.* keys, config in the metadata.


def _key_summary(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> str:
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape-mismatched", shapes),
    ):
        if keys:
            shown = ", ".join(list(keys)[:5]) + (", ..." if len(keys) > 5 else "")
            parts.append(f"{len(keys)} {label} key(s): {shown}")
    return "; ".join(parts)


def _compare(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    shapes = sorted(
        f"{k} (file {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    return missing, unexpected, shapes


def _arch(encoder: nn.Module) -> str:
    cfg = getattr(encoder, "_config", None)
    if not cfg:
        return type(encoder).__name__
    keys = ("embed_dim", "depths", "num_heads")
    return f"{type(encoder).__name__}(" + ", ".join(f"{k}={cfg[k]}" for k in keys) + ")"


def _load_checked(
    encoder: nn.Module,
    state: dict[str, Tensor],
    path: PathLike,
    strict: bool,
    optional: Sequence[str] = (),
) -> list[str]:
    """Load ``state`` into ``encoder``; strict -> DataError on any mismatch. Returns missing keys."""
    expected = encoder.state_dict()
    missing, unexpected, shapes = _compare(expected, state)
    missing = [k for k in missing if k not in optional]
    if strict and (missing or unexpected or shapes):
        raise DataError(
            path,
            f"weights do not match {_arch(encoder)}: {_key_summary(missing, unexpected, shapes)}",
        )
    if missing or unexpected or shapes:
        log.warning(
            "%s: loading non-strictly into %s: %s",
            os.fspath(path),
            _arch(encoder),
            _key_summary(missing, unexpected, shapes),
        )
    usable = {
        k: v
        for k, v in state.items()
        if k in expected and tuple(v.shape) == tuple(expected[k].shape)
    }
    encoder.load_state_dict(usable, strict=False)
    return missing


def save_encoder(
    encoder: SwinV2Encoder,
    path: PathLike,
    extra: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` to a safetensors file as ``encoder.<timm key>`` (+ ``encoder.mask_token``).

    ``extra`` tensors (a stage's heads, e.g. ``decoder.weight``) are stored under their own keys,
    which must not start with ``encoder.``. The metadata holds the encoder config (JSON) so
    :func:`load_encoder` rebuilds it, plus ``metadata`` (JSON-serialisable, read back with
    :func:`read_metadata`). Written atomically; returns the path.
    """
    tensors: dict[str, Tensor] = {
        ENCODER_PREFIX + k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()
    }
    for k, v in (extra or {}).items():
        if k.startswith(ENCODER_PREFIX):
            raise ConfigError(
                f"extra tensor {k!r}: the prefix 'encoder.' is reserved for the encoder"
            )
        if not isinstance(v, Tensor):
            raise ConfigError(
                f"extra tensor {k!r}: expected a torch.Tensor, got {type(v).__name__}"
            )
        tensors[k] = v.detach().cpu().contiguous()
    meta = {META_FORMAT: _FORMAT_VERSION}
    cfg = getattr(encoder, "_config", None)
    if cfg:
        meta[META_CONFIG] = json.dumps(cfg, sort_keys=True)
    if metadata:
        try:
            meta[_META_USER] = json.dumps(dict(metadata), sort_keys=True)
        except TypeError as err:
            raise ConfigError(f"save_encoder metadata must be JSON-serialisable: {err}") from err
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=meta)
    return path


def read_safetensors_header(path: PathLike) -> tuple[dict[str, str], list[str]]:
    """(metadata, tensor names) of a ``.safetensors`` file, without reading its tensors.

    Raises:
        MissingFileError: no such file. DataError: not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            path,
            "encoder weights (a .safetensors file with encoder.* keys)",
            "written by save_encoder, e.g. a run's model.safetensors",
        )
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(
            path,
            f"not a readable safetensors file ({err}); official .pth checkpoints are imported "
            "with load_official_checkpoint",
        ) from err


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The ``metadata`` passed to :func:`save_encoder` (empty dict if none)."""
    meta, _ = read_safetensors_header(path)
    raw = meta.get(_META_USER)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(path, f"metadata {_META_USER!r} is not valid JSON: {err}") from err


def load_tensors(path: PathLike, prefix: str) -> dict[str, Tensor]:
    """All tensors of a weights file whose key starts with ``prefix``, with the prefix removed."""
    _, keys = read_safetensors_header(path)
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}


def load_encoder(
    path: PathLike,
    encoder: SwinV2Encoder | None = None,
    strict: bool = True,
    drop_mask_token: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> SwinV2Encoder:
    """Load ``encoder.*`` weights written by :func:`save_encoder`.

    Without ``encoder`` the architecture is rebuilt from the file's metadata, with
    ``overrides`` applied (e.g. ``img_size``, ``window_size``, ``pretrained_window_sizes``,
    ``drop_path_rate`` to open 192 px pre-trained weights in the 480 px fine-tuning geometry;
    every persistent weight is window-independent). ``drop_mask_token=True`` ignores the file's
    ``mask_token`` and does not require one (the encoder keeps its own). Missing file ->
    :class:`MissingFileError`; key or shape mismatch under ``strict`` -> :class:`DataError`
    listing the first missing and unexpected keys.
    """
    meta, keys = read_safetensors_header(path)
    if encoder is None:
        raw = meta.get(META_CONFIG)
        if raw is None:
            raise DataError(
                path,
                f"no encoder config in the metadata (key {META_CONFIG!r}); pass encoder= built "
                "with build_encoder",
            )
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(path, f"metadata {META_CONFIG!r} is not valid JSON: {err}") from err
        encoder = build_encoder({**cfg, **(overrides or {})})
    elif overrides:
        raise ConfigError("load_encoder: pass either encoder= or overrides=, not both")
    enc_keys = [k for k in keys if k.startswith(ENCODER_PREFIX)]
    if not enc_keys:
        raise DataError(
            path,
            f"no 'encoder.*' keys (found {len(keys)} keys, e.g. {', '.join(keys[:3]) or 'none'}); "
            "official Swin-v2 / SimMIM checkpoints are imported with load_official_checkpoint",
        )
    with safe_open(os.fspath(path), framework="pt") as f:
        state = {k[len(ENCODER_PREFIX) :]: f.get_tensor(k) for k in enc_keys}
    optional: list[str] = []
    if drop_mask_token:
        state.pop("mask_token", None)
        optional.append("mask_token")
    _load_checked(encoder, state, path, strict, optional)
    return encoder


# ---------------------------------------------------------------------------------------------
# Official Swin-v2 / SimMIM / depth-repository checkpoints (spec 2.7, 3.2, 3.3).


def _listed(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


@dataclasses.dataclass
class ImportReport:
    """What :func:`load_official_checkpoint` did with the file's keys (a run prints :meth:`summary`)."""

    original_layout: bool
    """Patch merging at the end of each stage (``layers.0.downsample.reduction.weight`` found)."""
    dropped: list[str]
    """Source weights not loaded on purpose (decoder, classifier head, ...), in the file's naming."""
    renamed: int
    """Number of keys renamed (layout move, ``rpe_mlp``, ``norm3``, ``head.fc``)."""
    mask_token_loaded: bool
    missing: list[str]
    """Target keys the file lacks (only non-empty when ``strict=False``)."""
    loaded: list[str] = dataclasses.field(default_factory=list)
    """Target (timm) keys that took the file's values."""
    reinitialised: list[str] = dataclasses.field(default_factory=list)
    """Target keys left at their initial values: ``mask_token`` when the file has none, and
    ``missing``."""
    recomputed: list[str] = dataclasses.field(default_factory=list)
    """The file's window buffers (``relative_position_index``, ``relative_coords_table``,
    ``attn_mask``), not loaded: the target computes them for its own windows (spec 3.2)."""

    def summary(self) -> str:
        """One line: what was loaded, re-initialised and dropped."""
        layout = "original layout, patch merging moved" if self.original_layout else "timm layout"
        parts = [f"encoder: {len(self.loaded)} tensors loaded ({layout}, {self.renamed} renamed)"]
        parts.append(
            "re-initialised: " + (_listed(self.reinitialised) if self.reinitialised else "none")
        )
        parts.append(
            f"dropped {len(self.dropped)}: {_listed(self.dropped)}"
            if self.dropped
            else "dropped: none"
        )
        if self.recomputed:
            parts.append(f"{len(self.recomputed)} window buffers recomputed")
        return "; ".join(parts)


_CONTAINERS = ("model", "state_dict", "module")
_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")
_ORIGINAL_LAYOUT_KEY = "layers.0.downsample.reduction.weight"


def read_state_file(path: Path) -> Any:
    """The object stored in a checkpoint: a ``.safetensors`` file's tensors as a dict, or a
    ``.pth`` / ``.ckpt`` read without executing pickled code (:func:`mesadepth.io.safe_torch_load`)."""
    if path.suffix == ".safetensors":
        with safe_open(os.fspath(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    # Never run code from a downloaded pickle (project rule): tensors, plain values and the
    # inert stand-ins of mesadepth.io.SAFE_CHECKPOINT_GLOBALS only.
    return safe_torch_load(path)


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint object, unwrapped from up to four ``model`` / ``state_dict``
    / ``module`` containers; :class:`DataError` naming ``path`` when there are none."""
    # Spec 2.7 step 1 / 3.3 step 1: training files wrap the state dict as model / state_dict /
    # module (possibly nested, e.g. {'model': {'state_dict': ...}}).
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        inner = next(
            (obj[c] for c in _CONTAINERS if c in obj and isinstance(obj[c], Mapping)), None
        )
        if inner is None:
            break
        obj, seen = inner, seen + 1
    if not isinstance(obj, Mapping):
        raise DataError(
            path, f"expected a state dict (a mapping of tensors), got {type(obj).__name__}"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise DataError(
            path,
            f"no tensors found; expected a state dict, optionally inside one of {_CONTAINERS} "
            f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})",
        )
    return state


def read_official_state(path: PathLike) -> dict[str, Tensor]:
    """The state dict of an official / SimMIM / depth-repository file, unwrapped (spec 3.3 step 1).

    Read without executing pickled code; ``model`` / ``state_dict`` / ``module`` containers are
    unwrapped and DataParallel's ``module.`` prefix stripped. Keys are otherwise the file's.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            path, "Swin-v2 checkpoint (.pth / .pt / .safetensors)", "official or SimMIM weights"
        )
    state = unwrap_state_dict(read_state_file(path), path)
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def import_official_state(
    state: Mapping[str, Tensor],
    encoder: SwinTransformerV2,
    path: PathLike,
    strict: bool = True,
) -> ImportReport:
    """Load the encoder part of an unwrapped official state dict (see :func:`load_official_checkpoint`).

    ``path`` names the file in errors. Exactly inverted by :func:`official_encoder_state`.
    """
    dropped: list[str] = []
    recomputed: list[str] = []
    renamed = 0
    state = dict(state)
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        dropped += [k for k in state if not k.startswith(ENCODER_PREFIX)]
        state = {
            k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
        }
    target = encoder.state_dict()
    out: dict[str, Tensor] = {}
    original = _ORIGINAL_LAYOUT_KEY in state
    has_head = any(k.startswith("head.") for k in target)
    for key, value in state.items():
        if any(b in key for b in _BUFFERS):
            recomputed.append(key)
            continue
        if key.startswith("decoder."):
            dropped.append(key)
            continue
        if key == "mask_token" and "mask_token" not in target:
            dropped.append(key)
            continue
        new = key.replace("rpe_mlp", "cpb_mlp")
        if new == "norm3" or new.startswith("norm3."):
            new = "norm" + new[len("norm3") :]
        if original:
            new = _REF_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample", new)
            if new.startswith("head.") and not new.startswith("head.fc."):
                new = "head.fc." + new[len("head.") :]
        if new.startswith("head.") and not has_head:
            dropped.append(key)
            continue
        if new in out:
            raise DataError(
                path, f"two source keys map to {new!r} (e.g. both 'norm' and 'norm3'); expected one"
            )
        renamed += new != key
        out[new] = value
    optional = ["mask_token"] if "mask_token" in target and "mask_token" not in out else []
    hint = ""
    if any("relative_position_bias_table" in k for k in out):
        hint = " (relative_position_bias_table keys: this looks like a Swin-v1 checkpoint)"
    try:
        missing = _load_checked(encoder, out, path, strict, optional)
    except DataError as err:
        raise DataError(path, err.problem + hint) from None
    loaded = [k for k, v in out.items() if k in target and tuple(v.shape) == tuple(target[k].shape)]
    return ImportReport(
        original_layout=original,
        dropped=dropped,
        renamed=renamed,
        mask_token_loaded="mask_token" in out,
        missing=missing,
        loaded=loaded,
        reinitialised=[*optional, *missing],
        recomputed=recomputed,
    )


def load_official_checkpoint(
    path: PathLike, encoder: SwinTransformerV2, strict: bool = True
) -> ImportReport:
    """Import an official Swin-v2 / SimMIM / depth-repository checkpoint into a timm encoder.

    Spec 3.3 (and the key map of 3.2): read with ``weights_only=True``; unwrap ``model`` /
    ``state_dict`` / ``module``; strip ``module.``; if ``encoder.*`` keys exist keep only those
    (drops ``decoder.*`` and other heads) and strip the prefix; drop ``decoder.*``; keep
    ``mask_token`` iff the target has one (a source without one leaves the target's initial
    token, e.g. supervised checkpoints); rename ``rpe_mlp`` -> ``cpb_mlp`` and ``norm3.`` ->
    ``norm.`` (depth repo); drop ``relative_position_index`` / ``relative_coords_table`` /
    ``attn_mask`` (recomputed for the target window); if ``layers.0.downsample.reduction.weight``
    is present (original layout) move ``layers.N.downsample`` -> ``layers.(N+1).downsample`` and
    ``head.`` -> ``head.fc.``; drop ``head.*`` when the target has no head (``num_classes=0``).
    Then load; under ``strict`` any missing / unexpected / mis-shaped key is a
    :class:`DataError` listing them; ``strict=False`` is an explicit partial load whose gaps the
    report lists (``missing``, ``reinitialised``) and a warning names. Build ``encoder`` with the
    *target* geometry (img size, windows, ``pretrained_window_sizes``) first. The SimMIM decoder
    of a SimMIM file is imported by :func:`mesadepth.models.simmim.load_simmim_checkpoint`; the
    inverse is :func:`official_encoder_state` (``mesadepth export``).
    """
    path = Path(path)
    return import_official_state(read_official_state(path), encoder, path, strict)


# ---------------------------------------------------------------------------------------------
# The inverse: this project's encoder -> the official / depth-repository key layout (export).

OfficialNaming = Literal["official", "depth_repo"]


def official_encoder_state(
    encoder: SwinTransformerV2,
    naming: OfficialNaming = "official",
    *,
    mask_token: bool = False,
    buffers: bool = True,
) -> dict[str, Tensor]:
    """The encoder's weights as the reference Swin-v2 modules name and order them (spec 3.2).

    Exact inverse of :func:`import_official_state`: patch merging goes back to the end of the
    previous stage (``layers.(N+1).downsample`` -> ``layers.N.downsample``); ``naming="official"``
    (microsoft/Swin-Transformer ``SwinTransformerV2``, SimMIM's encoder) keeps ``cpb_mlp`` and
    ``norm``; ``naming="depth_repo"`` (MIM-Depth-Estimation's encoder) writes ``rpe_mlp`` and
    ``norm3`` and has no ``attn_mask`` (it builds the mask in every forward). ``mask_token``
    adds the SimMIM token (first, as the SimMIM encoder registers it). ``buffers`` adds the
    persistent buffers those modules keep in their state dicts, computed for this encoder's
    windows: ``attn.relative_coords_table`` (1, 2Wh-1, 2Ww-1, 2) float32,
    ``attn.relative_position_index`` (Wh Ww, Wh Ww) int64 and, official naming, ``attn_mask``
    (nW, Wh Ww, Wh Ww) with 0 / -100 on shifted blocks. Keys follow the reference modules'
    registration order; tensors are detached CPU copies. Raises :class:`ConfigError` if timm's
    state dict holds a key this map does not know (a timm version with other names).
    """
    if naming not in ("official", "depth_repo"):
        raise ConfigError(f"naming must be 'official' or 'depth_repo', got {naming!r}")
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in encoder.state_dict().items()}
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(src: str, dst: str) -> None:
        out[dst] = sd[src]
        used.add(src)

    if mask_token and "mask_token" in sd:
        put("mask_token", "mask_token")
    for k in [k for k in sd if k.startswith("patch_embed.")]:
        put(k, k)
    n = len(encoder.layers)
    for s, stage in enumerate(encoder.layers):
        for b, block in enumerate(stage.blocks):
            prefix = f"layers.{s}.blocks.{b}."
            mask = getattr(block, "attn_mask", None)
            if buffers and naming == "official" and mask is not None:
                out[prefix + "attn_mask"] = mask.detach().cpu().clone().contiguous()
            # The reference block registers norm1, attn, norm2, mlp (timm: attn, norm1, mlp, norm2).
            own = [
                k
                for part in ("norm1.", "attn.", "norm2.", "mlp.")
                for k in sd
                if k.startswith(prefix + part)
            ]
            # The reference registers the two window buffers on the attention module, so they
            # come after its parameters (logit_scale, q_bias, v_bias) and before its children.
            first_child = next((k for k in own if k.startswith(prefix + "attn.cpb_mlp.")), None)
            for k in own:
                if buffers and k == first_child:
                    attn = block.attn
                    for name in ("relative_coords_table", "relative_position_index"):
                        t = getattr(attn, name)
                        out[prefix + "attn." + name] = t.detach().cpu().clone().contiguous()
                dst = k.replace("cpb_mlp", "rpe_mlp") if naming == "depth_repo" else k
                put(k, dst)
        if s + 1 < n:
            down = f"layers.{s + 1}.downsample."
            for k in [k for k in sd if k.startswith(down)]:
                put(k, f"layers.{s}.downsample." + k[len(down) :])
    final = "norm3." if naming == "depth_repo" else "norm."
    for k in [k for k in sd if k.startswith("norm.")]:
        put(k, final + k[len("norm.") :])
    left = [k for k in sd if k not in used and not (k == "mask_token" and not mask_token)]
    if left:
        raise ConfigError(
            f"official_encoder_state: {len(left)} key(s) of this timm encoder have no reference "
            f"name: {_listed(left)}"
        )
    return out


def reference_geometry(
    encoder: SwinV2Encoder, naming: OfficialNaming
) -> tuple[dict[str, Any], list[str]]:
    """Reference constructor settings that rebuild ``encoder``'s windows, and notes on the rest.

    ``naming="official"``: microsoft/Swin-Transformer config keys (``DATA.IMG_SIZE``,
    ``MODEL.SWINV2.WINDOW_SIZE`` (one int: the official model clips it per stage to the token
    map, as timm does), ``PRETRAINED_WINDOW_SIZES``, ...). ``naming="depth_repo"``:
    MIM-Depth-Estimation command-line options (``--window_size`` / ``--pretrain_window_size`` /
    ``--use_shift`` per stage, ``--depths``, ``--backbone``). Notes say what the reference
    cannot reproduce (a window it has no setting for, another LayerNorm eps).
    """
    cfg = encoder.config
    notes: list[str] = []
    eff = [tuple(int(v) for v in stage.blocks[0].window_size) for stage in encoder.layers]
    grids = [tuple(int(v) for v in stage.blocks[0].input_resolution) for stage in encoder.layers]
    shifted = [
        any(g > w for g, w in zip(gr, ws, strict=True)) for gr, ws in zip(grids, eff, strict=True)
    ]
    pre = _per_stage(cfg.get("pretrained_window_sizes", 0), len(eff), "pretrained_window_sizes")
    eps = float(cfg["layer_norm_eps"])
    if any(h != w for h, w in eff) or any(h != w for h, w in pre):
        notes.append(
            f"non-square windows {eff} / pretrained {list(pre)}: the reference windows are square"
        )
    if naming == "official":
        img = cfg["img_size"]
        single = None
        for cand in sorted(
            {int(w) for ws in cfg["window_size"] for w in ([ws] if isinstance(ws, int) else ws)}
            | {w for w, _ in eff}
        ):
            clipped = [(min(min(g), cand),) * 2 for g in grids]
            if clipped == eff:
                single = cand
                break
        geometry: dict[str, Any] = {
            "DATA.IMG_SIZE": img[0] if img[0] == img[1] else img,
            "MODEL.SWINV2.EMBED_DIM": cfg["embed_dim"],
            "MODEL.SWINV2.DEPTHS": cfg["depths"],
            "MODEL.SWINV2.NUM_HEADS": cfg["num_heads"],
            "MODEL.SWINV2.WINDOW_SIZE": single,
            "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES": [p[0] for p in pre],
        }
        if single is None:
            notes.append(
                f"the per-stage windows {[w for w, _ in eff]} have no single official WINDOW_SIZE; "
                "the official loaders drop the window buffers written here and compute their own"
            )
        if not math.isclose(eps, 1e-5):
            notes.append(
                f"LayerNorm eps {eps:g} here, 1e-5 in the official Swin-v2: features differ slightly"
            )
        return geometry, notes
    widths = {96: "tiny", 128: "base", 192: "large", 352: "huge"}
    name = widths.get(int(cfg["embed_dim"]))
    if name is None:
        notes.append(
            f"embed_dim {cfg['embed_dim']}: GLPDepth derives the width from --backbone "
            "(tiny 96, base 128, large 192, huge 352) and has none for this one"
        )
    geometry = {
        "--backbone": f"swin_{name}_v2" if name else None,
        "--depths": cfg["depths"],
        "--window_size": [w for w, _ in eff],
        "--pretrain_window_size": [
            p[0] if p[0] > 0 else w for p, (w, _) in zip(pre, eff, strict=True)
        ],
        "--use_shift": shifted,
        "--drop_path_rate": cfg["drop_path_rate"],
    }
    if not math.isclose(eps, 1e-6):
        notes.append(
            f"LayerNorm eps {eps:g} here, 1e-6 in MIM-Depth-Estimation's encoder: features differ slightly"
        )
    return geometry, notes
