"""No-decay parameter groups, linear LR scaling and warm-up schedules (spec 1.6, 1.7)."""

from __future__ import annotations

import math

import pytest
import timm
import timm.optim
import torch
from torch import nn

from mesadepth.errors import ConfigError
from mesadepth.models.backbone import SwinV2Encoder, build_encoder
from mesadepth.optim import (
    WarmupSchedule,
    build_scheduler,
    is_no_decay,
    param_groups_layer_decay,
    param_groups_no_decay,
    scaled_lr,
)

# ----------------------------------------------------------------------------- groups


class _Wrapper(nn.Module):
    """SimMIM-like wrapper: ``encoder.*`` (tiny timm Swin-v2 + mask token) and ``decoder.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = timm.create_model(
            "swinv2_tiny_window8_256",
            pretrained=False,
            embed_dim=16,
            depths=(1, 1, 1, 1),
            num_heads=(1, 1, 1, 1),
            img_size=64,
            window_size=4,
            num_classes=0,
        )
        self.encoder.mask_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.decoder = nn.Sequential(nn.Conv2d(128, 32 * 32 * 3, 1), nn.PixelShuffle(32))


@pytest.fixture(scope="module")
def wrapper() -> _Wrapper:
    torch.manual_seed(0)
    return _Wrapper()


def _by_names(groups: list[dict]) -> tuple[set[str], set[str]]:
    return set(groups[0]["names"]), set(groups[1]["names"])


# Hand-listed: the only >= 2-D tensors that are not biases in this 4-stage, 1-block model.
_PER_BLOCK_DECAY = (
    "qkv.weight",
    "proj.weight",
    "logit_scale",
    "cpb_mlp.0.weight",
    "cpb_mlp.2.weight",
)
_PER_BLOCK_MLP = ("mlp.fc1.weight", "mlp.fc2.weight")


def _expected_reference_decay() -> set[str]:
    names = {"encoder.patch_embed.proj.weight", "decoder.0.weight"}
    for s in range(4):
        blk = f"encoder.layers.{s}.blocks.0"
        names |= {f"{blk}.attn.{p}" for p in _PER_BLOCK_DECAY}
        names |= {f"{blk}.{p}" for p in _PER_BLOCK_MLP}
        if s > 0:
            names.add(f"encoder.layers.{s}.downsample.reduction.weight")
    return names  # 2 + 4 * 7 + 3 = 33


def test_reference_groups_on_tiny_swinv2(wrapper: _Wrapper) -> None:
    groups = param_groups_no_decay(wrapper, 0.05, rule="reference")
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = _by_names(groups)
    all_names = {n for n, _ in wrapper.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(all_names)
    assert decay == _expected_reference_decay()
    assert len(decay) == 33
    # Spot checks of the faithful rule (spec 1.6).
    assert "encoder.mask_token" in no_decay  # 3-D, exempt by name
    assert "encoder.layers.0.blocks.0.attn.q_bias" in no_decay
    assert "encoder.layers.2.blocks.0.attn.v_bias" in no_decay
    assert "encoder.layers.1.blocks.0.norm1.weight" in no_decay
    assert "encoder.norm.weight" in no_decay and "encoder.norm.bias" in no_decay
    assert "encoder.layers.0.blocks.0.attn.cpb_mlp.0.bias" in no_decay
    assert "decoder.0.bias" in no_decay
    assert "encoder.layers.3.blocks.0.attn.logit_scale" in decay
    assert "encoder.layers.3.blocks.0.attn.cpb_mlp.2.weight" in decay
    # params and names line up.
    params = dict(wrapper.named_parameters())
    assert all(p is params[n] for n, p in zip(groups[0]["names"], groups[0]["params"], strict=True))


def test_intended_groups_move_cpb_and_logit_scale(wrapper: _Wrapper) -> None:
    ref_decay, _ = _by_names(param_groups_no_decay(wrapper, 0.05, rule="reference"))
    decay, no_decay = _by_names(param_groups_no_decay(wrapper, 0.05, rule="intended"))
    moved = ref_decay - decay
    # 3 tensors per block (logit_scale, cpb_mlp.0.weight, cpb_mlp.2.weight) x 4 blocks; the
    # same count is 72 for Swin-v2-L's 24 blocks (spec 1.6).
    assert len(moved) == 12 and decay <= ref_decay
    assert all(("logit_scale" in n) or ("cpb_mlp" in n) for n in moved)
    # The intended rule covers timm's own no_weight_decay() list.
    assert {f"encoder.{n}" for n in wrapper.encoder.no_weight_decay()} <= no_decay


@pytest.fixture(scope="module")
def encoder() -> SwinV2Encoder:
    torch.manual_seed(0)
    return build_encoder("tiny-cpu")


def _no_decay_names(groups: list[dict]) -> set[str]:
    return {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}


def test_encoder_no_weight_decay_is_the_optimizers_no_decay_set(encoder: SwinV2Encoder) -> None:
    # Pre-training groups (spec 1.6): the default of both is the reference rule.
    ref = encoder.no_weight_decay()
    assert ref == _no_decay_names(param_groups_no_decay(encoder, 0.05))
    assert encoder.no_weight_decay("intended") == _no_decay_names(
        param_groups_no_decay(encoder, 0.05, rule="intended")
    )
    # Fine-tuning groups (spec 2.5) with layer-wise decay, on the bare encoder.
    ft = param_groups_layer_decay(encoder, 0.05, 0.85, encoder.config["depths"], encoder_prefix="")
    assert encoder.no_weight_decay("finetune") == _no_decay_names(ft)
    # The spec's reference rule, by hand: 1-D tensors, .bias names and mask_token; logit_scale
    # (heads, 1, 1) and the cpb_mlp weight matrices are decayed.
    params = dict(encoder.named_parameters())
    by_hand = {n for n, p in params.items() if p.ndim == 1 or n.endswith(".bias")}
    assert ref == by_hand | {"mask_token"}
    n_blocks = sum(encoder.config["depths"])
    extra = {
        n for n in params if n.endswith(("logit_scale", "cpb_mlp.0.weight", "cpb_mlp.2.weight"))
    }
    assert len(extra) == 3 * n_blocks and not extra & ref
    assert encoder.no_weight_decay("intended") == ref | extra
    assert encoder.no_weight_decay("finetune") == by_hand | extra  # mask_token decays there
    with pytest.raises(ConfigError, match="rule"):
        encoder.no_weight_decay("timm")  # type: ignore[arg-type]


def test_timm_optimizer_factory_builds_the_reference_groups(encoder: SwinV2Encoder) -> None:
    # timm reads no_weight_decay() (no argument) and adds its own 1-D / .bias rule.
    opt = timm.optim.create_optimizer_v2(encoder, "adamw", lr=1e-4, weight_decay=0.05)
    names = {id(p): n for n, p in encoder.named_parameters()}
    timm_no_decay = {
        names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]
    }
    assert timm_no_decay == _no_decay_names(param_groups_no_decay(encoder, 0.05))
    for rule in ("intended", "finetune"):
        groups = timm.optim.param_groups_weight_decay(
            encoder, 0.05, no_weight_decay_list=encoder.no_weight_decay(rule)
        )
        got = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        assert got == encoder.no_weight_decay(rule)


def test_swinv2_large_reference_rule_decays_72_more_tensors_than_intended() -> None:
    # Spec 1.6, verified on the anchor: 72 logit_scale / cpb_mlp tensors decayed in Swin-v2-L.
    with torch.device("meta"):
        enc = build_encoder("swinv2_large_window12_192")
    moved = enc.no_weight_decay("intended") - enc.no_weight_decay()
    assert len(moved) == 72 and enc.no_weight_decay() <= enc.no_weight_decay("intended")


def test_skip_names_match_last_component_at_any_prefix() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.inner = nn.Module()
            self.inner.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.mask_token_proj = nn.Parameter(torch.zeros(8, 8))  # not an exact component
            self.frozen = nn.Parameter(torch.zeros(8, 8), requires_grad=False)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))

    m = M()
    decay, no_decay = _by_names(param_groups_no_decay(m, 0.1))
    assert no_decay == {"absolute_pos_embed", "inner.mask_token"}
    assert decay == {"mask_token_proj", "relative_position_bias_table"}  # frozen left out
    _, no_decay_i = _by_names(param_groups_no_decay(m, 0.1, rule="intended"))
    assert "relative_position_bias_table" in no_decay_i
    assert not is_no_decay("w", torch.zeros(2, 2), skip_names=())
    with pytest.raises(ConfigError):
        param_groups_no_decay(m, 0.1, rule="timm")  # type: ignore[arg-type]


def test_groups_drive_adamw_decay() -> None:
    # With zero gradients AdamW only applies decoupled decay: p <- p * (1 - lr * wd).
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = torch.optim.AdamW(param_groups_no_decay(lin, 0.5), lr=0.1)
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 * 0.95)
    torch.testing.assert_close(lin.bias.detach(), b0)
    assert opt.param_groups[0]["names"] == ["weight"]


# ----------------------------------------------------------------------------- scaling


def test_scaled_lr_hand_values() -> None:
    assert scaled_lr(1e-4, 2048) == pytest.approx(4e-4, rel=1e-12)
    assert scaled_lr(5e-7, 2048) == pytest.approx(2e-6, rel=1e-12)
    assert scaled_lr(1e-4, 2048, accumulation=2) == pytest.approx(8e-4, rel=1e-12)
    assert scaled_lr(2e-4, 256) == pytest.approx(1e-4, rel=1e-12)
    assert scaled_lr(1e-4, 512, accumulation=1) == pytest.approx(1e-4, rel=1e-12)
    with pytest.raises(ConfigError):
        scaled_lr(1e-4, 0)
    with pytest.raises(ConfigError):
        scaled_lr(1e-4, 512, accumulation=0)


# ----------------------------------------------------------------------------- schedules


def _used_lrs(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, n: int):
    """LR of each group used by iterations 0..n-1 (optimizer.step then scheduler.step)."""
    used = []
    for _ in range(n):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return used


def _sgd(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def test_multistep_hand_values() -> None:
    # 800-epoch recipe shrunk: N = 1 iteration/epoch, warm-up 10, milestone 70, total 80,
    # lr 4e-4, warm-up lr 2e-6. Warm-up slope (4e-4 - 2e-6) / 10 = 3.98e-5 per iteration.
    s = WarmupSchedule(4e-4, 2e-6, 10, 80, "multistep", milestones=(70,))
    assert s.lr_at(0) == pytest.approx(2e-6, rel=1e-12)
    assert s.lr_at(1) == pytest.approx(2e-6 + 3.98e-5, rel=1e-12)
    assert s.lr_at(5) == pytest.approx(2.01e-4, rel=1e-12)
    assert s.lr_at(9) == pytest.approx(3.602e-4, rel=1e-12)
    assert s.lr_at(10) == pytest.approx(4e-4, rel=1e-12)  # end of warm-up
    assert s.lr_at(69) == pytest.approx(4e-4, rel=1e-12)
    assert s.lr_at(70) == pytest.approx(4e-5, rel=1e-12)  # milestone: number <= t
    assert s.lr_at(79) == pytest.approx(4e-5, rel=1e-12)

    opt = _sgd(4e-4)
    sched = build_scheduler(opt, total_iters=80, warmup_iters=10, warmup_lr=2e-6, milestones=[70])
    used = [u[0] for u in _used_lrs(opt, sched, 80)]
    # Iterations 0 and 1 both run at the warm-up LR (pitfall 19); iteration t+1 runs at lr(t).
    assert used[0] == used[1] == pytest.approx(2e-6, rel=1e-12)
    assert used[2] == pytest.approx(2e-6 + 3.98e-5, rel=1e-12)
    assert used[10] == pytest.approx(3.602e-4, rel=1e-12)
    assert used[11] == pytest.approx(4e-4, rel=1e-12)
    assert used[70] == pytest.approx(4e-4, rel=1e-12)
    assert used[71] == pytest.approx(4e-5, rel=1e-12)
    assert used == [s.lr_for_step(k) for k in range(80)]  # bit-exact


def test_cosine_simmim_variant_hand_values() -> None:
    # T = 120, T_w = 20, lr 1e-3, min 1e-5, warm-up 1e-6. SimMIM repo: cosine over the full T
    # with t unshifted, so at the end of warm-up cos(pi * 20/120) = cos(pi/6) = sqrt(3)/2.
    s = WarmupSchedule(1e-3, 1e-6, 20, 120, "cosine", min_lr=1e-5, cosine_variant="simmim")
    half = 0.5 * (1e-3 - 1e-5)  # 4.95e-4
    assert s.lr_at(0) == pytest.approx(1e-6, rel=1e-12)
    assert s.lr_at(19) == pytest.approx(1e-6 + 19 * (1e-3 - 1e-6) / 20, rel=1e-12)
    assert s.lr_at(20) == pytest.approx(1e-5 + half * (1 + math.sqrt(3) / 2), rel=1e-12)
    assert s.lr_at(60) == pytest.approx(1e-5 + half, rel=1e-12)  # mid-point t = T/2: 5.05e-4
    assert s.lr_at(90) == pytest.approx(1e-5 + half * (1 - math.sqrt(2) / 2), rel=1e-12)
    assert s.lr_at(120) == s.lr_at(500) == 1e-5


def test_cosine_swin_variant_hand_values() -> None:
    # Swin-Transformer repo: warm-up prefix, cosine over T - T_w = 100 with t - T_w.
    s = WarmupSchedule(1e-3, 1e-6, 20, 120, "cosine", min_lr=1e-5, cosine_variant="swin")
    half = 0.5 * (1e-3 - 1e-5)
    assert s.lr_at(20) == pytest.approx(1e-3, rel=1e-12)  # full peak at the end of warm-up
    assert s.lr_at(70) == pytest.approx(1e-5 + half, rel=1e-12)  # mid-point 20 + 50
    assert s.lr_at(45) == pytest.approx(1e-5 + half * (1 + math.sqrt(2) / 2), rel=1e-12)
    assert s.lr_at(120) == 1e-5

    opt = _sgd(1e-3)
    sched = build_scheduler(
        opt,
        total_iters=120,
        warmup_iters=20,
        warmup_lr=1e-6,
        kind="cosine",
        min_lr=1e-5,
        cosine_variant="swin",
    )
    used = [u[0] for u in _used_lrs(opt, sched, 121)]
    assert used[0] == used[1] == pytest.approx(1e-6, rel=1e-12)
    assert used[21] == pytest.approx(1e-3, rel=1e-12)
    assert used[71] == pytest.approx(1e-5 + half, rel=1e-12)
    assert used == [s.lr_for_step(k) for k in range(121)]


def test_scheduler_groups_share_warmup_start() -> None:
    # Two groups with peaks 4e-4 and 2e-4: both start at the absolute warm-up LR (timm's scalar
    # warmup_lr_init) and reach their own peak; the milestone divides both by 10.
    opt = _sgd(4e-4, 2e-4)
    sched = build_scheduler(opt, total_iters=20, warmup_iters=4, warmup_lr=2e-6, milestones=[10])
    used = _used_lrs(opt, sched, 20)
    assert used[0] == pytest.approx([2e-6, 2e-6], rel=1e-12)
    assert used[3] == pytest.approx([2e-6 + 2 * 0.995e-4, 2e-6 + 2 * 0.495e-4], rel=1e-12)
    assert used[5] == pytest.approx([4e-4, 2e-4], rel=1e-12)
    assert used[11] == pytest.approx([4e-5, 2e-5], rel=1e-12)


def test_scheduler_resumes_from_state_dict() -> None:
    opt = _sgd(4e-4)
    sched = build_scheduler(opt, total_iters=20, warmup_iters=4, warmup_lr=2e-6, milestones=[10])
    _used_lrs(opt, sched, 7)
    state = sched.state_dict()
    opt2 = _sgd(4e-4)
    sched2 = build_scheduler(opt2, total_iters=20, warmup_iters=4, warmup_lr=2e-6, milestones=[10])
    sched2.load_state_dict(state)
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched.last_epoch == 8


def test_lambda_multiplier_matches() -> None:
    s = WarmupSchedule(4e-4, 2e-6, 10, 80, "multistep", milestones=(70,))
    opt = _sgd(4e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.as_lambda())
    used = [u[0] for u in _used_lrs(opt, sched, 80)]
    assert used == pytest.approx([s.lr_for_step(k) for k in range(80)], rel=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "linear"},
        {"milestones": (5,)},  # before the end of warm-up (10)
        {"milestones": (70, 30)},
        {"kind": "cosine", "cosine_variant": "timm"},
        {"warmup_iters": -1},
    ],
)
def test_schedule_bad_config(kwargs: dict) -> None:
    base = {"lr": 4e-4, "warmup_lr": 2e-6, "warmup_iters": 10, "total_iters": 80}
    with pytest.raises(ConfigError):
        WarmupSchedule(**{**base, **kwargs})


@pytest.mark.parametrize("variant", ["simmim", "swin"])
def test_cosine_bit_exact_against_timm_driven_like_the_reference(variant: str) -> None:
    # The reference builds timm's CosineLRScheduler (warm-up prefix only in the Swin repo) and
    # calls step_update(t) after optimizer step t; the lr in the group before step t is what
    # iteration t uses. Two groups check that warm-up and floor are shared absolute values.
    from timm.scheduler import CosineLRScheduler

    total, warm, prefix = 120, 20, variant == "swin"
    opt_ref = _sgd(1e-3, 3e-4)
    ref = CosineLRScheduler(
        opt_ref,
        t_initial=total - warm if prefix else total,
        lr_min=1e-5,
        warmup_lr_init=1e-6,
        warmup_t=warm,
        cycle_limit=1,
        t_in_epochs=False,
        warmup_prefix=prefix,
    )
    expected = []
    for t in range(130):
        expected.append([g["lr"] for g in opt_ref.param_groups])
        ref.step_update(t)
    opt = _sgd(1e-3, 3e-4)
    sched = build_scheduler(
        opt,
        total_iters=total,
        warmup_iters=warm,
        warmup_lr=1e-6,
        kind="cosine",
        min_lr=1e-5,
        cosine_variant=variant,  # type: ignore[arg-type]
    )
    assert _used_lrs(opt, sched, 130) == expected


def test_scheduler_state_is_plain_and_round_trips_through_a_safe_load(tmp_path):
    """A checkpointed scheduler must load with torch's weights_only loader (no pickled classes)."""
    from mesadepth.optim import build_scheduler

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(
        opt, total_iters=20, warmup_iters=4, warmup_lr=0.1, kind="multistep", milestones=[10]
    )
    for _ in range(12):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    other = build_scheduler(opt2, total_iters=99, warmup_iters=1, warmup_lr=0.5, kind="cosine")
    other.load_state_dict(state)
    assert other.schedule == sched.schedule
    opt.step(), sched.step(), opt2.step(), other.step()
    assert other.get_last_lr() == sched.get_last_lr()
