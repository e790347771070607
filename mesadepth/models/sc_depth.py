"""Import of released SC-Depth v1/v2/v3 checkpoints (spec 8) into DepthNet / PoseNet / RectifyNet.

Specification: geometric-and-supervised-pretraining.md section 8 (Lightning ``.ckpt`` layout,
prefixes ``depth_net.`` / ``pose_net.`` / ``rectify_net.``, the doubled ``encoder.encoder.``, the
unused ``fc.*``, the pickled ``argparse.Namespace`` under ``hyper_parameters``), 2.1-2.4.

Key map, per network: ``{net}.encoder.encoder.<k>`` -> ``encoder.<k>``; ``{net}.encoder.encoder.fc.*``
dropped (our encoders have no classifier); ``{net}.decoder.<k>`` unchanged (our decoders use the
reference's names). Files are read with :func:`mesadepth.io.safe_torch_load` (the Namespace is
allow-listed; no pickled code runs).

Layouts accepted: (1) the Lightning checkpoint of spec 8 (``state_dict`` + ``hyper_parameters``
...); (2) the same prefixed keys as a bare state dict, optionally under ``state_dict``;
(3) a single network's state dict without the system prefix (``encoder.encoder.*`` +
``decoder.*``), the shape of SC-SfMLearner's separate ``dispnet`` / ``exp_pose`` ``.pth.tar``
files. Spec 8 does not describe (3); it is recognised by key names only, not checked against
real released files. The ResNet depth of each network is read from its keys (layer counts,
bottleneck ``conv3``), cross-checked with ``hparams.resnet_layers``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from mesadepth.errors import DataError, MissingFileError
from mesadepth.io import safe_torch_load
from mesadepth.models.dispnet import DepthNet, build_depthnet
from mesadepth.models.posenet import PoseNet, load_strict
from mesadepth.models.rectify import RectifyNet

__all__ = [
    "NETWORKS",
    "SCDepthImportReport",
    "load_sc_depth_checkpoint",
    "read_sc_depth_checkpoint",
    "resnet_depth",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
NETWORKS = ("depth_net", "pose_net", "rectify_net")
_DOUBLED = "encoder.encoder."
_BLOCK = re.compile(r"^encoder\.layer3\.(\d+)\.")
_RESNET_BY_BLOCKS = {
    (False, 2): 18,
    (False, 6): 34,
    (True, 6): 50,
    (True, 23): 101,
    (True, 36): 152,
}


@dataclasses.dataclass
class SCDepthImportReport:
    """What :func:`load_sc_depth_checkpoint` found and did."""

    layout: str
    """``lightning`` (spec 8), ``state_dict`` (prefixed keys, no Lightning wrapper) or ``bare``."""
    model_version: str | None
    """``hparams.model_version`` (v1/v2/v3); without hparams ``v2`` if ARN keys exist, else None."""
    resnet_layers: dict[str, int]
    """ResNet depth per network found in the file, read from its keys."""
    loaded: list[str]
    """Networks whose weights were loaded (strictly): a subset of :data:`NETWORKS`."""
    dropped: list[str]
    """Source keys (file naming) not loaded: the unused classifiers, and an ARN nobody asked for."""
    hparams: dict[str, Any]
    """The pickled ``argparse.Namespace`` as a plain dict (empty when absent)."""
    source_keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """The file's keys per network, in the file's naming."""
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | None = None


def _first_keys(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "(none)"


def _unknown(path: PathLike, keys: list[str], why: str) -> DataError:
    return DataError(
        path,
        f"unknown checkpoint layout ({why}); expected an SC-Depth Lightning checkpoint whose "
        "state_dict has depth_net.* / pose_net.* / rectify_net.* keys (spec 8), or one network's "
        f"state dict with encoder.encoder.* and decoder.* keys; first keys: {_first_keys(keys)}",
    )


def _hparams(obj: Mapping[str, Any]) -> dict[str, Any]:
    raw = obj.get("hyper_parameters")
    if isinstance(raw, Mapping) and "hparams" in raw:
        raw = raw["hparams"]
    if isinstance(raw, argparse.Namespace):
        return dict(vars(raw))
    return dict(raw) if isinstance(raw, Mapping) else {}


def _map_network(state: Mapping[str, Tensor], dropped: list[str], source: str) -> dict[str, Tensor]:
    """Reference names of one network -> ours (doubled prefix collapsed, ``fc.*`` dropped)."""
    out = {}
    for key, value in state.items():
        if key.startswith(_DOUBLED + "fc."):
            dropped.append(source + key)
            continue
        out["encoder." + key[len(_DOUBLED) :] if key.startswith(_DOUBLED) else key] = value
    return out


def resnet_depth(state: Mapping[str, Tensor]) -> int | None:
    """ResNet depth (18/34/50/101/152) of a network state dict in our naming, from its keys."""
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    bottleneck = "encoder.layer1.0.conv3.weight" in state
    return _RESNET_BY_BLOCKS.get((bottleneck, len(blocks)))


def read_sc_depth_checkpoint(
    path: PathLike,
) -> tuple[dict[str, dict[str, Tensor]], SCDepthImportReport]:
    """Read an SC-Depth file into per-network state dicts in this project's naming.

    Returns ({"depth_net": ..., "pose_net": ..., "rectify_net": ...} for the networks present,
    report with ``loaded`` empty). Useful to initialise networks non-strictly (the reference's
    stage chaining, spec 5); :func:`load_sc_depth_checkpoint` loads them strictly.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            path,
            "SC-Depth checkpoint (.ckpt)",
            "e.g. nyu_scv2/epoch=101-val_loss=0.1580.ckpt from the sc_depth_pl release",
        )
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise DataError(path, f"expected a checkpoint dict, got {type(obj).__name__}")
    top = [str(k) for k in obj]
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        state, layout = inner, "lightning" if "pytorch-lightning_version" in obj else "state_dict"
    elif obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, layout = obj, "state_dict"
    else:
        raise _unknown(path, top, "no state_dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    keys = list(state)
    dropped: list[str] = []
    nets: dict[str, dict[str, Tensor]] = {}
    sources: dict[str, list[str]] = {}
    if any(k.startswith(f"{n}.") for k in keys for n in NETWORKS):
        other = [k for k in keys if not k.startswith(tuple(f"{n}." for n in NETWORKS))]
        if other:
            raise _unknown(
                path, other, f"{len(other)} key(s) outside depth_net/pose_net/rectify_net"
            )
        for name in NETWORKS:
            sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            if sub:
                nets[name] = _map_network(sub, dropped, name + ".")
                sources[name] = [k for k in keys if k.startswith(name + ".")]
    elif any(k.startswith(_DOUBLED) for k in keys):
        layout = "bare"
        if any(k.startswith("decoder.upconvs0.") for k in keys):
            name = "depth_net"
        elif "decoder.convs_pose.2.weight" in state:
            outputs = state["decoder.convs_pose.2.weight"].shape[0]
            name = {6: "pose_net", 3: "rectify_net"}.get(outputs, "")
            if not name:
                raise _unknown(
                    path, keys, f"a pose decoder with {outputs} outputs (expected 6 or 3)"
                )
        else:
            raise _unknown(path, keys, "encoder.encoder.* keys without a known decoder")
        nets[name] = _map_network(state, dropped, "")
        sources[name] = keys
    else:
        raise _unknown(path, keys, "no known key prefix")

    hparams = _hparams(obj)
    depths = {}
    for name, sub in nets.items():
        depth = resnet_depth(sub)
        if depth is None:
            raise DataError(
                path,
                f"{name}: expected a ResNet-18/34/50/101/152 encoder under {name}.encoder.encoder.*, "
                f"found keys {_first_keys([k for k in sub if k.startswith('encoder.')])}",
            )
        depths[name] = depth
    declared = hparams.get("resnet_layers")
    if declared is not None and "depth_net" in depths and declared != depths["depth_net"]:
        log.warning(
            "%s: hparams.resnet_layers=%s but the depth_net keys are a ResNet-%d; using the keys",
            path,
            declared,
            depths["depth_net"],
        )
    version = hparams.get("model_version") or ("v2" if "rectify_net" in nets else None)
    report = SCDepthImportReport(
        layout=layout,
        model_version=version,
        resnet_layers=depths,
        loaded=[],
        dropped=dropped,
        hparams=hparams,
        source_keys=sources,
        epoch=obj.get("epoch") if isinstance(obj.get("epoch"), int) else None,
        global_step=obj.get("global_step") if isinstance(obj.get("global_step"), int) else None,
        lightning_version=obj.get("pytorch-lightning_version"),
    )
    return nets, report


def load_sc_depth_checkpoint(
    path: PathLike,
    depth_net: DepthNet | None = None,
    pose_net: PoseNet | None = None,
    *,
    rectify_net: RectifyNet | None = None,
) -> tuple[DepthNet, PoseNet | None, SCDepthImportReport]:
    """Load a released SC-Depth checkpoint (spec 8) into a ResNet DepthNet and PoseNet.

    Networks not given are built to match the file: ``build_depthnet("resnet<N>")`` (input
    passed through as the reference does, ``input_norm="reference"``) and ``PoseNet(N)``; the
    returned PoseNet is None when the file has no pose weights. ``rectify_net`` (v2 files) is
    loaded only when given; otherwise its keys are listed in ``report.dropped``. Every load is
    strict: a key or shape mismatch (e.g. a Swin-v2 DepthNet, which cannot take the released
    ResNet depth weights) is a :class:`DataError` naming the keys. Use
    :func:`read_sc_depth_checkpoint` for non-strict initialisation.
    """
    nets, report = read_sc_depth_checkpoint(path)
    if "depth_net" not in nets:
        raise DataError(
            path,
            f"holds no DepthNet weights (found: {', '.join(nets)}); load single pose/ARN files "
            "with read_sc_depth_checkpoint",
        )
    if depth_net is None:
        depth_net = build_depthnet(
            f"resnet{report.resnet_layers['depth_net']}", input_norm="reference"
        )
    load_strict(
        depth_net,
        nets["depth_net"],
        path,
        f"this DepthNet (the file's depth_net.* is a ResNet-{report.resnet_layers['depth_net']} "
        f"DepthNet: build the target with build_depthnet('resnet{report.resnet_layers['depth_net']}'))",
    )
    report.loaded.append("depth_net")
    if "pose_net" in nets:
        if pose_net is None:
            pose_net = PoseNet(num_layers=report.resnet_layers["pose_net"])
        load_strict(pose_net, nets["pose_net"], path, "this PoseNet (pose_net.* keys)")
        report.loaded.append("pose_net")
    elif pose_net is not None:
        raise DataError(path, "holds no pose_net.* weights, but a PoseNet was given to load")
    if "rectify_net" in nets:
        if rectify_net is not None:
            load_strict(
                rectify_net, nets["rectify_net"], path, "this RectifyNet (rectify_net.* keys)"
            )
            report.loaded.append("rectify_net")
        else:
            report.dropped += [
                k for k in report.source_keys["rectify_net"] if k not in report.dropped
            ]
    elif rectify_net is not None:
        raise DataError(path, "holds no rectify_net.* weights (only v2 checkpoints have an ARN)")
    return depth_net, pose_net, report
