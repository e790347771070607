"""``mesadepth export``: this project's weights in the reference codes' checkpoint layouts.

The inverse of the official imports (spec masked-pretraining-and-finetuning.md 3.2, 3.3, 2.7):
a ``model.safetensors`` of any stage (timm keys under ``encoder.*``; a masked run's SimMIM
decoder, a fine-tuned run's depth head) becomes a file that the reference code loads:

- ``swinv2``: microsoft/Swin-Transformer ``SwinTransformerV2`` (``num_classes=0``, or a zero
  classifier with ``classifier_head``) as ``{'model': state_dict}``, the form its
  ``load_pretrained`` functions read;
- ``simmim``: that repository's SimMIM model, ``{'model': {'encoder.*' (with
  ``encoder.mask_token``), 'decoder.0.weight', 'decoder.0.bias'}}``, as its pre-training saves;
- ``mim-depth``: MIM-Depth-Estimation's ``GLPDepth`` as a bare state dict (what its
  ``test.py`` loads strictly): ``encoder.*`` in that repository's naming (``rpe_mlp``, ``norm3``,
  patch merging at the end of each stage), plus ``decoder.*`` and ``last_layer_depth.*`` for a
  fine-tuned depth model; an encoder-only file is what its ``--pretrained`` reads.

Key names, shapes, order and the persistent window buffers (``relative_coords_table``,
``relative_position_index``, and ``attn_mask`` in the official model) are those of the reference
modules' ``state_dict()``; the round trip official -> mesadepth -> official is exact. A ``.pth``
is ``torch.save`` of plain dicts of tensors (loads with ``weights_only=True``); a
``.safetensors`` holds the same tensors flat (no ``model`` wrapper) with the layout in its
metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mesadepth.errors import ConfigError, DataError, MissingFileError

__all__ = ["LAYOUTS", "ExportReport", "export_official", "official_state"]

_FORMATTER = argparse.RawDescriptionHelpFormatter

Layout = Literal["swinv2", "simmim", "mim-depth"]
LAYOUTS: tuple[str, ...] = ("swinv2", "simmim", "mim-depth")
Container = Literal["auto", "model", "flat"]
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_official` wrote and what the reference needs to rebuild the model."""

    source: str
    output: str
    layout: str
    container: str
    """``model`` (``{'model': state_dict}``) or ``flat`` (the state dict itself)."""
    tensors: int
    parts: list[str]
    """What the file holds: ``encoder``, ``mask_token``, ``simmim decoder``, ``depth head``."""
    left_out: list[str]
    """Source keys not written (other stages' heads, a mask token the layout has no place for)."""
    reference: dict[str, Any]
    """Reference settings that rebuild this geometry (config keys or command-line options)."""
    notes: list[str]

    def lines(self) -> list[str]:
        """Human-readable summary (what ``mesadepth export`` prints)."""
        # Other heads by prefix (a depth head has ~30 tensors); encoder keys one by one.
        groups: dict[str, int] = {}
        for k in self.left_out:
            g = k if k.startswith("encoder.") else k.split(".")[0] + ".*"
            groups[g] = groups.get(g, 0) + 1
        shown = ", ".join(
            g if n == 1 and not g.endswith("*") else f"{g} ({n})" for g, n in groups.items()
        )
        out = [
            f"wrote {self.output}: {self.layout} layout, {self.tensors} tensors"
            f"{' inside {model: ...}' if self.container == 'model' else ' (bare state dict)'}",
            f"  holds: {', '.join(self.parts)}",
            f"  left out: {shown or 'nothing'}",
            "  reference settings: "
            + " ".join(f"{k} {_fmt(v)}" for k, v in self.reference.items() if v is not None),
        ]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def official_state(
    source: str | os.PathLike[str],
    layout: Layout,
    buffers: bool = True,
    classifier_head: int = 0,
) -> tuple[dict[str, Tensor], ExportReport]:
    """The reference state dict of a mesadepth weights file, with a report (``output`` empty).

    ``source``: a ``.safetensors`` written by this project (``encoder.*`` + the encoder config in
    its metadata). ``buffers=False`` leaves out the window buffers (the official loaders drop
    them anyway; MIM-Depth-Estimation's strict ``test.py`` needs them). ``classifier_head=N``
    (``swinv2`` only) adds a zero ``head.weight`` (N, C) / ``head.bias`` (N): Swin-Transformer's
    supervised ``load_pretrained`` reads ``head.bias`` and re-initialises a head of another
    class count to exactly these zeros, so the file then loads there too.
    """
    from mesadepth.models.backbone import (
        ENCODER_PREFIX,
        OfficialNaming,
        load_encoder,
        load_tensors,
        official_encoder_state,
        read_metadata,
        reference_geometry,
    )
    from mesadepth.models.depth_head import load_depth_model, official_head_state

    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if classifier_head < 0 or (classifier_head and layout != "swinv2"):
        raise ConfigError(
            f"classifier_head={classifier_head}: a zero classifier of N >= 1 classes, for the "
            "swinv2 layout only"
        )
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(
            path, "mesadepth weights", "a run's model.safetensors, e.g. runs/demo/finetune/"
        )
    if path.suffix != ".safetensors":
        raise DataError(
            path,
            "expected this project's .safetensors (encoder.* keys and the encoder config); "
            "official .pth files are already in a reference layout",
        )
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(path, f"not a readable safetensors file: {err}") from err
    meta = read_metadata(path)
    is_depth = isinstance(meta.get("depth_head"), dict)
    head = None
    if is_depth:
        model = load_depth_model(path)
        encoder, head = model.encoder, model.decoder
    else:
        encoder = load_encoder(path)
    decoder = {} if is_depth else load_tensors(path, "decoder.")
    simmim_decoder = bool(decoder) and all(k.split(".")[0].isdigit() for k in decoder)

    naming: OfficialNaming = "depth_repo" if layout == "mim-depth" else "official"
    geometry, notes = reference_geometry(encoder, naming)
    enc = official_encoder_state(encoder, naming, mask_token=layout == "simmim", buffers=buffers)
    written = {ENCODER_PREFIX + k for k in encoder.state_dict()}
    parts = ["encoder"]
    if layout == "swinv2":
        state = enc
        written.discard(ENCODER_PREFIX + "mask_token")
        if classifier_head:
            width = int(encoder.num_features)
            state["head.weight"] = torch.zeros(classifier_head, width)
            state["head.bias"] = torch.zeros(classifier_head)
            parts.append(f"zero classifier ({classifier_head} classes)")
        else:
            notes.append(
                "no classifier: SimMIM fine-tuning (utils_simmim.load_pretrained) reads this; "
                "Swin-Transformer's supervised MODEL.PRETRAINED loader reads head.bias, so give "
                "--classifier-head N there"
            )
    elif layout == "simmim":
        state = {ENCODER_PREFIX + k: v for k, v in enc.items()}
        parts.append("mask_token")
        if simmim_decoder:
            # safetensors lists keys sorted; the reference module order is weight, then bias.
            def module_order(key: str) -> tuple[int, int, str]:
                index, name = key.split(".", 1)
                return int(index), {"weight": 0, "bias": 1}.get(name, 2), name

            for k in sorted(decoder, key=module_order):
                state["decoder." + k] = decoder[k].contiguous()
                written.add("decoder." + k)
            parts.append("simmim decoder")
        else:
            notes.append(
                "the source has no SimMIM decoder: encoder.* only (what SimMIM fine-tuning "
                "reads; resuming SimMIM pre-training from it starts a fresh decoder)"
            )
        if any(p > 0 for p in geometry["MODEL.SWINV2.PRETRAINED_WINDOW_SIZES"]):
            notes.append(
                "SimMIM's builder never passes PRETRAINED_WINDOW_SIZES (spec pitfall 17): its "
                "encoder computes the position bias with 0s, this one with "
                f"{geometry['MODEL.SWINV2.PRETRAINED_WINDOW_SIZES']}"
            )
    else:
        written.discard(ENCODER_PREFIX + "mask_token")
        state = {ENCODER_PREFIX + k: v for k, v in enc.items()}
        if head is not None:
            head_state = official_head_state(head)
            state.update(head_state)
            written |= {"decoder." + k for k in head.state_dict()}
            parts.append("depth head")
            cfg = head.config
            geometry.update(
                {
                    "--num_deconv": cfg["num_deconv"],
                    "--num_filters": cfg["num_filters"],
                    "--deconv_kernels": cfg["deconv_kernels"],
                    "--max_depth": cfg["max_depth"],
                }
            )
        else:
            notes.append(
                "encoder only: pass it as MIM-Depth-Estimation's --pretrained (its loader keeps "
                "the encoder.* keys, spec 2.7)"
            )
    left_out = [k for k in keys if k not in written]
    report = ExportReport(
        source=str(path),
        output="",
        layout=layout,
        container="flat",
        tensors=len(state),
        parts=parts,
        left_out=left_out,
        reference=geometry,
        notes=notes,
    )
    return state, report


def export_official(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    layout: Layout,
    container: Container = "auto",
    buffers: bool = True,
    overwrite: bool = False,
    classifier_head: int = 0,
) -> ExportReport:
    """Write ``source`` (a mesadepth ``.safetensors``) as a reference-layout checkpoint.

    ``output`` ending in ``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin`` is written with
    ``torch.save`` (plain dicts of tensors, no pickled code); ``.safetensors`` holds the state
    dict flat with the layout and the reference settings in its metadata. ``container="auto"``:
    ``{'model': ...}`` for ``swinv2`` / ``simmim`` ``.pth`` files (the Swin-Transformer loaders
    read ``checkpoint['model']``), a bare state dict otherwise (``mim-depth``: its ``test.py``
    loads one). ``classifier_head``: see :func:`official_state`. Written atomically; an
    existing ``output`` needs ``overwrite``.
    """
    from safetensors.torch import save_file

    from mesadepth.io import atomic_path

    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (*_TORCH_SUFFIXES, ".safetensors"):
        raise ConfigError(
            f"{out}: choose the format by the suffix: .pth (torch.save) or .safetensors"
        )
    if container not in ("auto", "model", "flat"):
        raise ConfigError(f"container must be auto, model or flat, got {container!r}")
    if container == "model" and suffix == ".safetensors":
        raise ConfigError(
            f"{out}: a .safetensors file is flat; the {{'model': ...}} wrapper needs a .pth"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if out.resolve() == Path(source).resolve():
        raise ConfigError(f"{out}: the output would overwrite the source")
    state, report = official_state(source, layout, buffers=buffers, classifier_head=classifier_head)
    if container == "auto":
        container = "model" if layout != "mim-depth" and suffix != ".safetensors" else "flat"
    report.container = container
    report.output = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if suffix == ".safetensors":
            meta = {
                "mesadepth.export_layout": layout,
                "mesadepth.reference": json.dumps(report.reference),
            }
            save_file(state, os.fspath(tmp), metadata=meta)
        else:
            torch.save({"model": state} if container == "model" else state, tmp)
    return report


# ----------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to ``sub``."""
    p = sub.add_parser(
        "export",
        help="write a model.safetensors in an official layout (Swin-v2, SimMIM, MIM-Depth)",
        formatter_class=_FORMATTER,
        description=(
            "Write this project's weights as a checkpoint the reference code loads: the inverse\n"
            "of the official imports (key names, shapes, patch-merging placement, position-bias\n"
            "MLP and output-norm names, window buffers, the {'model': ...} wrapper).\n\n"
            "Layouts:\n"
            "  swinv2     microsoft/Swin-Transformer SwinTransformerV2 (encoder), {'model': ...}\n"
            "  simmim     its SimMIM model: encoder.* with mask_token, and the SimMIM decoder of\n"
            "             a masked run, {'model': ...}\n"
            "  mim-depth  MIM-Depth-Estimation's GLPDepth: encoder.* in its naming (rpe_mlp,\n"
            "             norm3), plus decoder.* / last_layer_depth.* of a fine-tuned model; a\n"
            "             bare state dict (its test.py --ckpt_dir; an encoder alone is a\n"
            "             --pretrained file)\n\n"
            "The command prints the reference settings that rebuild the same geometry (windows,\n"
            "pretrained windows, shifts, head) and what was left out.\n\n"
            "  mesadepth export runs/demo/finetune/model.safetensors nyu_mesa.pth --layout mim-depth\n"
            "  mesadepth export runs/paper/masked/model.safetensors mesa_simmim.pth --layout simmim\n"
            "  mesadepth export runs/paper/supervised/model.safetensors swinv2_l.pth --layout swinv2"
        ),
    )
    p.add_argument("source", type=Path, help="a mesadepth .safetensors (a run's model.safetensors)")
    p.add_argument("output", type=Path, help="file to write: .pth (torch.save) or .safetensors")
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="reference layout (see above)")
    p.add_argument(
        "--container",
        default="auto",
        choices=("auto", "model", "flat"),
        help="model = {'model': state_dict}; flat = the state dict; auto = model for swinv2 / "
        "simmim .pth, flat for mim-depth and .safetensors",
    )
    p.add_argument(
        "--no-buffers",
        action="store_true",
        help="leave out relative_coords_table / relative_position_index / attn_mask (the "
        "official loaders recompute them; MIM-Depth's strict test.py needs them)",
    )
    p.add_argument(
        "--classifier-head",
        type=int,
        default=0,
        metavar="N",
        help="swinv2: add a zero N-class head.weight/head.bias (Swin-Transformer's supervised "
        "MODEL.PRETRAINED loader reads head.bias and zeroes a mismatched head itself)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = export_official(
        args.source,
        args.output,
        args.layout,
        container=args.container,
        buffers=not args.no_buffers,
        overwrite=args.overwrite,
        classifier_head=args.classifier_head,
    )
    print("\n".join(report.lines()))
    return 0
