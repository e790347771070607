"""SimMIM masked image modelling: mask generator, prediction head and the training wrapper.

Specification: masked-pretraining-and-finetuning.md sections 1.1 (mask generator), 1.2 (mask
token), 1.3 (encoder stride and decoder), 1.4 (loss) and pitfalls 1, 3, 7, 18.

Mask conventions (1 = masked everywhere):

- *cell* grid: one value per ``mask_patch_size`` square (6 x 6 at 192 / 32);
- *token* mask: one value per model patch (48 x 48 at 192 / 4), what the encoder consumes,
  shape (h, w) per image and (B, h, w) batched;
- *pixel* mask: (B, 1, H, W), what the loss consumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from mesadepth.errors import ConfigError, DataError
from mesadepth.losses.masked import local_normalised_target, masked_l1_loss

__all__ = [
    "MaskGenerator",
    "MaskedEncoder",
    "SimMIM",
    "SimMIMDecoder",
    "SimMIMImportReport",
    "load_simmim_checkpoint",
    "mask_to_pixels",
    "pixels_to_mask",
]


def _pair(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise ConfigError(f"{what} must be an int or an (h, w) pair, got {size!r}")
    if min(pair) <= 0:
        raise ConfigError(f"{what} must be positive, got {size!r}")
    return pair


class MaskGenerator:
    """SimMIM random block mask (spec 1.1), drawn from an explicit NumPy generator.

    The input is split into cells of ``mask_patch_size`` pixels; exactly
    ``n = ceil(cells * mask_ratio)`` cells are masked (22 of 36 at 192 / 32 / 0.6; a float
    ceiling, pitfall 18), chosen as the first ``n`` entries of a uniform permutation. Each cell
    is then repeated ``mask_patch_size // model_patch_size`` times along both axes.

    Args:
        input_size: image side in pixels, or (H, W) for a non-square input.
        mask_patch_size: cell side in pixels (32).
        model_patch_size: encoder patch-embedding stride in pixels (4).
        mask_ratio: fraction of cells to mask, in [0, 1] (0.6).

    Raises:
        ConfigError: a side is not divisible by ``mask_patch_size``, ``mask_patch_size`` is
            not divisible by ``model_patch_size``, or the ratio is outside [0, 1].
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        self.input_size = _pair(input_size, "input_size")
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ConfigError(
                f"patch sizes must be positive, got mask {mask_patch_size}, model {model_patch_size}"
            )
        if any(s % mask_patch_size for s in self.input_size):
            raise ConfigError(
                f"input size {self.input_size} is not divisible by mask_patch_size {mask_patch_size}"
            )
        if mask_patch_size % model_patch_size:
            raise ConfigError(
                f"mask_patch_size {mask_patch_size} is not divisible by model_patch_size "
                f"{model_patch_size}"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid_size = (
            self.input_size[0] // mask_patch_size,
            self.input_size[1] // mask_patch_size,
        )
        self.scale = mask_patch_size // model_patch_size
        self.num_cells = self.grid_size[0] * self.grid_size[1]
        # np.ceil on the float product, as the reference: 36 * 0.6 = 21.6 -> 22 (pitfall 18).
        self.num_masked = int(math.ceil(self.num_cells * mask_ratio))

    @property
    def token_size(self) -> tuple[int, int]:
        """Shape (h, w) of one token mask: input size / model patch size."""
        return (self.grid_size[0] * self.scale, self.grid_size[1] * self.scale)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Draw one token mask, shape ``token_size`` (48 x 48 by default), int64, 1 = masked.

        ``rng`` is the per-sample generator; passing it explicitly replaces the reference's
        NumPy global RNG, which duplicates masks across loader workers (pitfall 7).
        """
        cells = np.zeros(self.num_cells, dtype=np.int64)
        cells[rng.permutation(self.num_cells)[: self.num_masked]] = 1
        grid = cells.reshape(self.grid_size)
        return grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


def mask_to_pixels(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask (B, h, w) -> pixel mask (B, 1, h * patch_size, w * patch_size) (spec 1.1).

    Nearest-neighbour repetition; the dtype is kept. ``patch_size`` is the model patch size (4).
    """
    if mask.ndim != 3:
        raise ConfigError(f"token mask must be (B, h, w), got {tuple(mask.shape)}")
    pix = mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return pix.unsqueeze(1)


def pixels_to_mask(mask_pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) -> token mask (B, H / patch_size, W / patch_size).

    A token is masked if any of its pixels is (max over each patch), so this exactly inverts
    :func:`mask_to_pixels` on aligned masks and is conservative on others.
    """
    if mask_pixels.ndim != 4 or mask_pixels.shape[1] != 1:
        raise ConfigError(f"pixel mask must be (B, 1, H, W), got {tuple(mask_pixels.shape)}")
    b, _, h, w = mask_pixels.shape
    if h % patch_size or w % patch_size:
        raise ConfigError(f"pixel mask {h}x{w} is not divisible by patch size {patch_size}")
    blocks = mask_pixels.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size)
    return blocks.amax(dim=(2, 4))


class SimMIMDecoder(nn.Sequential):
    """SimMIM prediction head (spec 1.3): 1x1 Conv2d to ``stride^2 * out_channels``, PixelShuffle.

    (B, in_channels, H/s, W/s) -> (B, out_channels, H, W). PyTorch default init, with bias, no
    activation. A :class:`~torch.nn.Sequential` so that its keys are ``0.weight`` / ``0.bias``,
    the layout of the reference checkpoints (``decoder.0.weight``).
    """

    def __init__(self, in_channels: int, encoder_stride: int = 32, out_channels: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, encoder_stride**2 * out_channels, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )
        self.encoder_stride = encoder_stride
        self.out_channels = out_channels


class MaskedEncoder(Protocol):
    """What :class:`SimMIM` needs from an encoder (e.g. ``mesadepth.models.backbone.SwinV2Encoder``).

    ``mask_token`` (1, 1, C0) parameter; ``num_features`` = C_final; ``patch_embed.patch_size``
    (int or (p, p)); ``forward_features_masked(x (B,3,H,W), mask (B,h,w)) -> (B,C_final,H/s,W/s)``.
    """

    mask_token: nn.Parameter
    num_features: int
    patch_embed: nn.Module

    def forward_features_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class SimMIM(nn.Module):
    """Encoder + SimMIM decoder + masked L1 loss (spec 1.2-1.4).

    State-dict keys are ``encoder.*`` (including ``encoder.mask_token``) and ``decoder.*``, as
    in the reference checkpoints (spec 1.8).

    Args:
        encoder: a :class:`MaskedEncoder` (the mask token lives on it).
        encoder_stride: total downsampling of the encoder output (32 for Swin).
        in_chans: image channels reconstructed by the decoder (3).
        norm_target: use the locally normalised target (Swin-v2 recipe) instead of the image.
        norm_target_patch_size: odd window side of the normalisation (47).
    """

    def __init__(
        self,
        encoder: nn.Module,
        encoder_stride: int = 32,
        in_chans: int = 3,
        norm_target: bool = False,
        norm_target_patch_size: int = 47,
    ) -> None:
        super().__init__()
        for attr in ("mask_token", "num_features", "patch_embed", "forward_features_masked"):
            if not hasattr(encoder, attr):
                raise ConfigError(f"SimMIM encoder {type(encoder).__name__} lacks `{attr}`")
        patch = _pair(encoder.patch_embed.patch_size, "encoder.patch_embed.patch_size")
        if patch[0] != patch[1]:
            raise ConfigError(f"SimMIM needs a square model patch, got {patch}")
        if norm_target and (norm_target_patch_size % 2 != 1 or norm_target_patch_size < 3):
            # Fail at construction, not at the first training step.
            raise ConfigError(
                f"norm-target patch size must be odd and >= 3, got {norm_target_patch_size}"
            )
        self.encoder = encoder
        self.decoder = SimMIMDecoder(int(encoder.num_features), encoder_stride, in_chans)
        self.encoder_stride = encoder_stride
        self.in_chans = in_chans
        self.patch_size = patch[0]
        self.norm_target = norm_target
        self.norm_target_patch_size = norm_target_patch_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct masked regions and score them.

        Args:
            x: ImageNet-normalised images (B, in_chans, H, W), H and W multiples of the stride.
            mask: token mask (B, H / patch, W / patch), 1 = masked (from :class:`MaskGenerator`).

        Returns:
            ``(loss, reconstruction)``: the 0-D masked L1 loss (spec 1.4) and the decoder output
            (B, in_chans, H, W).
        """
        z = self.encoder.forward_features_masked(x, mask)
        x_rec = self.decoder(z)
        target = local_normalised_target(x, self.norm_target_patch_size) if self.norm_target else x
        mask_pixels = mask_to_pixels(mask, self.patch_size)
        loss = masked_l1_loss(target, x_rec, mask_pixels)
        return loss, x_rec


# ----------------------------------------------------------------------------- checkpoint import

_DECODER = "decoder."


@dataclasses.dataclass
class SimMIMImportReport:
    """What :func:`load_simmim_checkpoint` took from a file: encoder, mask token and decoder.

    ``loaded`` and ``reinitialised`` use the model's names (``encoder.*``, ``decoder.*``);
    ``dropped`` the file's. ``decoder`` is ``loaded``, ``absent`` (the file has no decoder),
    ``skipped`` (``decoder=False`` was asked) or ``other_head`` (the file's ``decoder.*`` is
    another head, e.g. a depth model's, so it cannot be SimMIM's).
    """

    path: str
    decoder: Literal["loaded", "absent", "skipped", "other_head"]
    loaded: list[str]
    reinitialised: list[str]
    dropped: list[str]
    original_layout: bool = False
    recomputed: int = 0

    def summary(self) -> str:
        """One line for the run's output: what was loaded, re-initialised and dropped."""

        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        enc = sum(k.startswith("encoder.") for k in self.loaded)
        dec = {
            "loaded": "decoder loaded",
            "absent": "no decoder in the file",
            "skipped": "its decoder skipped (init_decoder=false)",
            "other_head": "its decoder.* is not a SimMIM decoder",
        }[self.decoder]
        parts = [
            f"init {self.path}: {enc} encoder tensors loaded"
            + (" (patch merging moved from the original layout)" if self.original_layout else ""),
            dec,
            "re-initialised: " + (listed(self.reinitialised) or "none"),
            "dropped: " + (listed(self.dropped) or "none"),
        ]
        if self.recomputed:
            parts.append(f"{self.recomputed} window buffers recomputed")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record (counts for the long lists) for metrics.json."""
        return {
            "path": self.path,
            "decoder": self.decoder,
            "loaded": len(self.loaded),
            "reinitialised": list(self.reinitialised),
            "dropped": list(self.dropped),
            "original_layout": self.original_layout,
        }


def load_simmim_checkpoint(
    path: str | os.PathLike[str], model: SimMIM, decoder: bool = True
) -> SimMIMImportReport:
    """Initialise a :class:`SimMIM` from a file: encoder, mask token and, when present, decoder.

    Files: this project's ``.safetensors`` (``encoder.*`` + the masked stage's ``decoder.*``),
    or an official Swin-v2 / SimMIM / depth-repository ``.pth`` (spec 3.3, read by
    :func:`~mesadepth.models.backbone.read_official_state`; the SimMIM wrapper's
    ``decoder.0.weight`` / ``decoder.0.bias`` already carry this decoder's names, spec 1.3). The
    encoder load is strict except that a file without ``mask_token`` (a supervised Swin-v2)
    leaves the token at its initial value. The decoder is loaded strictly when the file has a
    SimMIM decoder and ``decoder`` is true; one that does not fit (another encoder width, stride
    or channel count) is a :class:`DataError` naming the keys, never a silent re-initialisation.
    A ``decoder.*`` that is another head (a depth model's) is dropped and reported. The
    reference SimMIM resumes its own checkpoints whole; starting a new run from one, it loads
    only the encoder: ``decoder=False`` reproduces that.
    """
    from mesadepth.models.backbone import (
        ENCODER_PREFIX,
        import_official_state,
        load_encoder,
        load_tensors,
        read_metadata,
        read_official_state,
    )

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        load_encoder(path, encoder=model.encoder)
        with safe_open(os.fspath(path), framework="pt") as f:
            keys = list(f.keys())
        loaded = [ENCODER_PREFIX + k for k in model.encoder.state_dict()]
        reinit: list[str] = []
        head = load_tensors(path, _DECODER)
        # A fine-tuned depth model's decoder.* is its depth head (save_depth_model's metadata).
        other_head = "depth_head" in read_metadata(path)
        dropped = [k for k in keys if not k.startswith((ENCODER_PREFIX, _DECODER))]
        original, recomputed = False, 0
    else:
        state = read_official_state(path)
        report = import_official_state(state, model.encoder, path, strict=True)
        loaded = [ENCODER_PREFIX + k for k in report.loaded]
        reinit = [ENCODER_PREFIX + k for k in report.reinitialised]
        head = {k[len(_DECODER) :]: v for k, v in state.items() if k.startswith(_DECODER)}
        other_head = False
        dropped = [k for k in report.dropped if not k.startswith(_DECODER)]
        original, recomputed = report.original_layout, len(report.recomputed)
    expected = model.decoder.state_dict()
    # SimMIM's decoder is an nn.Sequential (keys 0.weight, 0.bias); e.g. the depth repo's head
    # (deconv_layers.*, conv_layers.*) is not one.
    other_head = other_head or not all(k.split(".")[0].isdigit() for k in head)
    dec_keys = [_DECODER + k for k in expected]
    if head and other_head:
        status: Literal["loaded", "absent", "skipped", "other_head"] = "other_head"
        dropped += [_DECODER + k for k in head]
        reinit += dec_keys
    elif not head:
        status = "absent"
        reinit += dec_keys
    elif not decoder:
        status = "skipped"
        dropped += [_DECODER + k for k in head]
        reinit += dec_keys
    else:
        missing = [k for k in expected if k not in head]
        unexpected = [k for k in head if k not in expected]
        shapes = [
            f"decoder.{k} (file {tuple(head[k].shape)}, model {tuple(t.shape)})"
            for k, t in expected.items()
            if k in head and tuple(head[k].shape) != tuple(t.shape)
        ]
        if missing or unexpected or shapes:
            problems = "; ".join(
                f"{label}: {', '.join(keys[:4])}"
                for label, keys in (
                    ("missing", [_DECODER + k for k in missing]),
                    ("unexpected", [_DECODER + k for k in unexpected]),
                    ("shape-mismatched", shapes),
                )
                if keys
            )
            raise DataError(
                path,
                f"its SimMIM decoder does not fit this one (Conv2d {model.encoder.num_features} -> "
                f"{model.encoder_stride}^2 x {model.in_chans}, 1x1): {problems}; build the encoder "
                "like the file's, or start a fresh decoder with encoder.init_decoder=false",
            )
        model.decoder.load_state_dict(head, strict=True)
        status = "loaded"
        loaded += dec_keys
    return SimMIMImportReport(
        path=str(path),
        decoder=status,
        loaded=loaded,
        reinitialised=reinit,
        dropped=dropped,
        original_layout=original,
        recomputed=recomputed,
    )
