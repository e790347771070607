"""Layer-wise LR decay groups and the triangle LR schedule of depth fine-tuning (spec 2.5, 2.6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mesadepth.errors import ConfigError
from mesadepth.models.backbone import SwinV2Encoder
from mesadepth.models.depth_head import DepthModel
from mesadepth.optim import (
    TriangleLR,
    TriangleSchedule,
    param_groups_layer_decay,
    swin_layer_id,
    swin_num_layers,
)

DEPTHS = (2, 2, 18, 2)


@pytest.fixture(scope="module")
def model() -> DepthModel:
    """Swin-v2-L-shaped depth model (depths 2, 2, 18, 2) at tiny width: embed 8, 1 head."""
    torch.manual_seed(0)
    enc = SwinV2Encoder(
        img_size=32, embed_dim=8, depths=DEPTHS, num_heads=(1, 1, 1, 1), window_size=2
    )
    return DepthModel.from_encoder(enc, num_filters=(4, 4, 4))


def _spec_table_id(name: str) -> int:
    """Layer id straight from the spec 2.5 table (timm names), written out row by row."""
    if name.startswith(("encoder.patch_embed.", "encoder.mask_token")):
        return 0
    if name.startswith("decoder.") or name.startswith("encoder.norm."):
        return 28
    parts = name.split(".")
    stage, kind = int(parts[2]), parts[3]
    if kind == "downsample":
        return {1: 3, 2: 6, 3: 25}[stage]
    block = int(parts[4])
    return {0: 1, 1: 4, 2: 7, 3: 26}[stage] + block


def test_num_layers_and_spot_ids():
    assert swin_num_layers(DEPTHS) == 29
    assert swin_num_layers((2, 2, 6, 2)) == 1 + 3 + 3 + 7 + 2 + 1
    cases = {
        "patch_embed.proj.weight": 0,
        "mask_token": 0,
        "absolute_pos_embed": 0,
        "layers.0.blocks.0.mlp.fc1.weight": 1,
        "layers.0.blocks.1.norm1.bias": 2,
        "layers.1.downsample.reduction.weight": 3,
        "layers.1.blocks.1.attn.qkv.weight": 5,
        "layers.2.downsample.norm.weight": 6,
        "layers.2.blocks.17.attn.logit_scale": 24,
        "layers.3.downsample.reduction.weight": 25,
        "layers.3.blocks.1.mlp.fc2.bias": 27,
        "norm.weight": 28,
        "head.fc.weight": 28,
    }
    for name, expected in cases.items():
        assert swin_layer_id(name, DEPTHS) == expected, name
    with pytest.raises(ConfigError):
        swin_layer_id("layers.2.blocks.18.norm1.weight", DEPTHS)
    with pytest.raises(ConfigError):
        swin_layer_id("layers.4.blocks.0.norm1.weight", DEPTHS)


def test_every_parameter_gets_the_spec_table_id_and_scale(model):
    groups = param_groups_layer_decay(model, 0.05, 0.85, DEPTHS)
    seen: dict[str, int] = {}
    for g in groups:
        for name in g["names"]:
            assert name not in seen, f"{name} in two groups"
            seen[name] = g["layer_id"]
            assert g["layer_id"] == _spec_table_id(name), name
        assert g["lr_scale"] == pytest.approx(0.85 ** (28 - g["layer_id"]), rel=1e-12)
    assert set(seen) == {n for n, _ in model.named_parameters()}
    assert seen["encoder.layers.2.blocks.17.attn.qkv.weight"] == 24
    assert seen["decoder.deconv_layers.0.weight"] == 28
    # The spec table's printed scales (0.85^(28 - id)).
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    printed = {0: 0.0106, 1: 0.0124, 2: 0.0146, 3: 0.0172, 4: 0.0202, 5: 0.0238, 6: 0.0280}
    printed.update({7: 0.0329, 24: 0.5220, 25: 0.6141, 26: 0.7225, 27: 0.85, 28: 1.0})
    for layer_id, value in printed.items():
        assert scale[layer_id] == pytest.approx(value, abs=5e-5), layer_id
    assert sorted(scale) == list(range(29))


def test_decay_and_no_decay_split(model):
    groups = param_groups_layer_decay(model, 0.05, 0.85, DEPTHS)
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    params = dict(model.named_parameters())
    for name, p in params.items():
        exempt = (
            p.ndim == 1
            or name.endswith(".bias")
            or "cpb_mlp" in name
            or "logit_scale" in name
            or "relative_position_bias_table" in name
        )
        assert wd[name] == (0.0 if exempt else 0.05), name
    # Spot checks of each rule.
    assert wd["encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight"] == 0.0  # 2-D, keyword
    assert params["encoder.layers.0.blocks.0.attn.logit_scale"].ndim == 3
    assert wd["encoder.layers.0.blocks.0.attn.logit_scale"] == 0.0
    assert wd["encoder.layers.0.blocks.0.attn.q_bias"] == 0.0  # 1-D
    assert wd["encoder.layers.0.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["decoder.deconv_layers.0.weight"] == 0.05
    assert wd["decoder.deconv_layers.1.weight"] == 0.0  # BatchNorm weight, 1-D
    # One group per (id, decay) pair, named accordingly.
    keys = [(g["layer_id"], g["weight_decay"] > 0) for g in groups]
    assert len(keys) == len(set(keys))
    assert {g["group_name"] for g in groups} >= {"layer_28_decay", "layer_28_no_decay"}


def test_reference_keyword_and_frozen_parameters():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.relative_position_bias_table = nn.Parameter(torch.zeros(4, 2))
            self.encoder.rpe_mlp = nn.Linear(2, 3, bias=False)
            self.encoder.patch_embed = nn.Linear(2, 2, bias=False)
            self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)

    groups = param_groups_layer_decay(Toy(), 0.05, 0.9, (1, 1))
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd == {
        "encoder.relative_position_bias_table": 0.0,
        "encoder.rpe_mlp.weight": 0.0,
        "encoder.patch_embed.weight": 0.05,
    }
    # (1, 1): K = 1 + 2 + 1 + 1 = 5; patch_embed id 0 -> 0.9^4; others id 4 -> 1.
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.weight"] == pytest.approx(0.9**4)
    assert scale["encoder.rpe_mlp.weight"] == 1.0


# ----------------------------------------------------------------------------- schedule


def _spec_formula(s: int, max_lr: float, min_lr: float, n: int, e: int) -> float:
    """Spec 2.6 written with T directly (the implementation divides s / N / h)."""
    t = n * (e // 2)
    if s < t:
        return (max_lr - min_lr) * (s / t) ** 0.9 + min_lr
    return max(min_lr, max_lr - (max_lr - min_lr) * (s / t - 1) ** 0.9)


def test_triangle_schedule_spec_test_vectors():
    sch = TriangleSchedule(max_lr=5e-4, min_lr=3e-5, iters_per_epoch=1009, epochs=25)
    assert sch.peak_step == 12108 and sch.total_steps == 25225
    # Printed to 6 significant digits in the spec.
    assert sch.lr_at(1) == pytest.approx(3.00994e-5, rel=2e-6)
    assert sch.lr_at(6054) == pytest.approx(2.81867e-4, rel=2e-6)
    assert sch.lr_at(18162) == pytest.approx(2.48133e-4, rel=2e-6)
    assert sch.lr_at(12108) == pytest.approx(5e-4, rel=1e-9)
    for s in (24216, 24217, 25000, 25225):
        assert sch.lr_at(s) == pytest.approx(3e-5, rel=1e-9)
    for s in (1, 2, 500, 6054, 12107, 12108, 12109, 18162, 24215, 24216):
        assert sch.lr_at(s) == pytest.approx(_spec_formula(s, 5e-4, 3e-5, 1009, 25), rel=1e-9)
    # Ramp up then down: a triangle, not warm-up + decay (pitfall 12).
    lrs = [sch.lr_at(s) for s in range(1, sch.total_steps + 1, 97)]
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))

    sch75 = TriangleSchedule(max_lr=5e-4, min_lr=3e-5, iters_per_epoch=1009, epochs=75)
    assert sch75.peak_step == 37333 and sch75.total_steps == 75675
    assert sch75.lr_at(37333) == pytest.approx(5e-4, rel=1e-9)
    for s in (74666, 75000, 75675):
        assert sch75.lr_at(s) == pytest.approx(3e-5, rel=1e-9)
    with pytest.raises(ConfigError):
        TriangleSchedule(max_lr=5e-4, min_lr=3e-5, iters_per_epoch=10, epochs=1)
    with pytest.raises(ConfigError):
        sch.lr_at(0)


def _optimizer() -> torch.optim.Optimizer:
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.AdamW(
        [{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.25}, {"params": [c]}],
        lr=123.0,
    )


def test_torch_wrapper_applies_lr_scale_and_sets_the_lr_before_each_step():
    sch = TriangleSchedule(max_lr=1.0, min_lr=0.1, iters_per_epoch=5, epochs=4)
    opt = _optimizer()
    scheduler = TriangleLR(opt, sch)
    for s in range(1, sch.total_steps + 1):
        # Step s runs at lr(s) x scale; a group without lr_scale uses 1.
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([sch.lr_at(s), 0.25 * sch.lr_at(s), sch.lr_at(s)], rel=1e-12)
        opt.step()
        scheduler.step()
    assert math.isclose(sch.lr_at(10), 1.0)


def test_scheduler_state_round_trips_through_weights_only_load(tmp_path):
    sch = TriangleSchedule(max_lr=1.0, min_lr=0.1, iters_per_epoch=5, epochs=4)
    opt = _optimizer()
    scheduler = TriangleLR(opt, sch)
    for _ in range(7):
        opt.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "sched.pt")
    state = torch.load(tmp_path / "sched.pt", weights_only=True)
    opt2 = _optimizer()
    other = TriangleLR(opt2, TriangleSchedule(max_lr=9.0, min_lr=0.0, iters_per_epoch=1, epochs=2))
    other.load_state_dict(state)
    assert other.schedule == sch and other.last_epoch == 7
    for _ in range(3):
        opt.step(), scheduler.step(), opt2.step(), other.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * sch.lr_at(11), rel=1e-12)
