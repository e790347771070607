"""Weight-decay parameter groups, linear LR scaling and the per-iteration warm-up schedules.

Specification: masked-pretraining-and-finetuning.md sections 1.6 (no-decay rule), 1.7 (linear
scaling, warm-up, multistep / cosine) and pitfalls 5, 6, 19; for depth fine-tuning sections 2.5
(layer-wise LR decay, fine-tuning no-decay rule) and 2.6 (triangle schedule, pitfalls 12, 23).

Schedule convention (spec 1.7, pitfall 19). ``lr(t)`` is the value the reference sets *after*
optimizer step ``t`` (``step_update(e * N + i)``), so iteration ``t + 1`` runs at ``lr(t)``,
and iteration 0 runs at ``lr(0)`` = the warm-up LR too: the first two iterations share it. The
torch scheduler from :func:`build_scheduler` reproduces this when ``scheduler.step()`` is called
once after every ``optimizer.step()``. The fine-tuning :class:`TriangleLR` follows the same
calling pattern but its step counter starts at 1 (spec 2.6): construction sets step 1's LR.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from mesadepth.errors import ConfigError

__all__ = [
    "FINETUNE_NO_DECAY_KEYWORDS",
    "INTENDED_SKIP_KEYWORDS",
    "REFERENCE_SKIP_NAMES",
    "TriangleLR",
    "TriangleSchedule",
    "WarmupLR",
    "WarmupSchedule",
    "build_scheduler",
    "is_no_decay",
    "is_no_decay_finetune",
    "param_groups_layer_decay",
    "param_groups_no_decay",
    "scaled_lr",
    "swin_layer_id",
    "swin_num_layers",
]

#: Last name components exempt from decay in the reference (its exact names are
#: ``encoder.mask_token`` / ``encoder.absolute_pos_embed``).
REFERENCE_SKIP_NAMES: tuple[str, ...] = ("mask_token", "absolute_pos_embed")
#: Extra components exempt under the "intended" rule (timm / official Swin-v2 no-decay keywords).
INTENDED_SKIP_KEYWORDS: tuple[str, ...] = ("cpb_mlp", "logit_scale", "relative_position_bias_table")

Rule = Literal["reference", "intended"]


def is_no_decay(
    name: str,
    param: torch.Tensor,
    skip_names: Iterable[str] = REFERENCE_SKIP_NAMES,
    rule: Rule = "reference",
) -> bool:
    """Whether parameter ``name`` gets weight decay 0 (spec 1.6).

    ``"reference"`` (faithful): 1-D tensors (biases, norm weights, Swin-v2 ``q_bias`` /
    ``v_bias``), names ending in ``.bias``, and names whose last dotted component is in
    ``skip_names``. The reference matches the exact names ``encoder.mask_token`` /
    ``encoder.absolute_pos_embed``; matching the last component makes the rule independent of
    the wrapper prefix (same result on a SimMIM model, a bare encoder or a depth model).
    ``logit_scale`` (heads, 1, 1) and the ``cpb_mlp`` weight matrices *are* decayed: the
    reference's keyword rule never matches (spec 1.6).

    ``"intended"``: additionally exempts any name with a dotted component in
    :data:`INTENDED_SKIP_KEYWORDS` (what timm's ``no_weight_decay()`` returns).

    For an encoder, :meth:`~mesadepth.models.backbone.SwinV2Encoder.no_weight_decay` with the
    same ``rule`` lists exactly the names this exempts (so timm's optimizer factory agrees).
    """
    if rule not in ("reference", "intended"):
        raise ConfigError(f"no-decay rule must be 'reference' or 'intended', got {rule!r}")
    parts = name.split(".")
    if param.ndim == 1 or name.endswith(".bias") or parts[-1] in set(skip_names):
        return True
    return rule == "intended" and any(p in INTENDED_SKIP_KEYWORDS for p in parts)


def param_groups_no_decay(
    model: nn.Module,
    weight_decay: float,
    skip_names: Sequence[str] = REFERENCE_SKIP_NAMES,
    rule: Rule = "reference",
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decay and a no-decay group (spec 1.6).

    Works on any module; membership follows :func:`is_no_decay`. Frozen parameters
    (``requires_grad=False``) are left out, as in the reference.

    Returns:
        ``[{"params", "names", "weight_decay": weight_decay},
        {"params", "names", "weight_decay": 0.0}]`` in ``named_parameters`` order, ready for
        :class:`torch.optim.AdamW`; ``names`` records membership for inspection (optimizers
        keep extra group keys).
    """
    decay: dict[str, list[Any]] = {"params": [], "names": []}
    no_decay: dict[str, list[Any]] = {"params": [], "names": []}
    skip = tuple(skip_names)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = no_decay if is_no_decay(name, param, skip, rule) else decay
        group["params"].append(param)
        group["names"].append(name)
    return [
        {**decay, "weight_decay": float(weight_decay)},
        {**no_decay, "weight_decay": 0.0},
    ]


def scaled_lr(lr_per_512: float, total_batch: int, accumulation: int = 1) -> float:
    """Linear scaling rule (spec 1.7, pitfall 5): ``lr * total_batch / 512`` (x accumulation).

    ``total_batch`` is per-GPU batch x number of GPUs (images per forward pass over all GPUs);
    with gradient accumulation > 1 the result is multiplied by the accumulation steps. Apply it
    to the base, warm-up and minimum LR alike. E.g. 1e-4 at 2048 -> 4e-4.
    """
    if total_batch <= 0 or accumulation < 1:
        raise ConfigError(
            f"total_batch must be > 0 and accumulation >= 1, got {total_batch}, {accumulation}"
        )
    lr = lr_per_512 * total_batch / 512.0
    if accumulation > 1:
        lr = lr * accumulation
    return lr


@dataclass(frozen=True)
class WarmupSchedule:
    """Per-iteration LR: linear warm-up then multistep or cosine (spec 1.7).

    All LRs are absolute values, already scaled (:func:`scaled_lr`); iterations are optimizer
    steps. ``lr_at(t)`` is the value set after step ``t`` (see the module docstring).

    - warm-up, ``t < warmup_iters``: ``warmup_lr + t * (lr - warmup_lr) / warmup_iters``;
    - ``"multistep"``: ``lr * gamma ** k``, ``k`` = number of ``milestones`` <= t (``min_lr``
      unused, pitfall 6);
    - ``"cosine"``, ``cosine_variant="simmim"`` (microsoft/SimMIM): ``min_lr + 0.5 (lr - min_lr)
      (1 + cos(pi t / T))`` over the full ``T = total_iters``, no warm-up prefix;
      ``cosine_variant="swin"`` (microsoft/Swin-Transformer, warm-up prefix on): the same with
      ``t - warmup_iters`` over ``T - warmup_iters``. ``min_lr`` from ``T`` on.

    Attributes:
        lr: peak LR. warmup_lr: LR at t = 0. warmup_iters: T_w. total_iters: T.
        kind: ``"multistep"`` or ``"cosine"``. milestones: iterations (multistep).
        gamma: multistep factor (0.1). min_lr: cosine floor. cosine_variant: see above.
    """

    lr: float
    warmup_lr: float
    warmup_iters: int
    total_iters: int
    kind: Literal["multistep", "cosine"] = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr: float = 0.0
    cosine_variant: Literal["simmim", "swin"] = "simmim"

    def __post_init__(self) -> None:
        if self.kind not in ("multistep", "cosine"):
            raise ConfigError(f"schedule kind must be 'multistep' or 'cosine', got {self.kind!r}")
        if self.cosine_variant not in ("simmim", "swin"):
            raise ConfigError(
                f"cosine_variant must be 'simmim' or 'swin', got {self.cosine_variant!r}"
            )
        if self.warmup_iters < 0 or self.total_iters <= 0:
            raise ConfigError(
                f"need warmup_iters >= 0 and total_iters > 0, got {self.warmup_iters}, "
                f"{self.total_iters}"
            )
        if self.kind == "cosine" and self.cosine_variant == "swin":
            if self.warmup_iters >= self.total_iters:
                raise ConfigError("swin cosine needs warmup_iters < total_iters")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing, got {self.milestones}")
        if self.kind == "multistep" and self.milestones and self.warmup_iters > self.milestones[0]:
            # The reference asserts warmup_t <= min(milestones).
            raise ConfigError(
                f"first milestone {self.milestones[0]} precedes the end of warm-up "
                f"{self.warmup_iters}"
            )

    def lr_at(self, t: int, base_lr: float | None = None) -> float:
        """LR set after iteration ``t`` (so used by iteration ``t + 1``).

        ``base_lr`` replaces ``lr`` (per-parameter-group peak LR); ``warmup_lr`` and ``min_lr``
        stay absolute, as timm's schedulers in the reference treat them.
        """
        if t < 0:
            raise ConfigError(f"iteration must be >= 0, got {t}")
        peak = self.lr if base_lr is None else base_lr
        if t < self.warmup_iters:
            # Same float operations as timm: warmup_lr_init + t * step.
            return self.warmup_lr + t * ((peak - self.warmup_lr) / self.warmup_iters)
        if self.kind == "multistep":
            return peak * (self.gamma ** bisect_right(self.milestones, t))
        t_cur, t_len = t, self.total_iters
        if self.cosine_variant == "swin":
            t_cur, t_len = t - self.warmup_iters, self.total_iters - self.warmup_iters
        if t_cur >= t_len:
            # timm: past cycle_limit = 1 the LR is pinned at lr_min.
            return self.min_lr
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1 + math.cos(math.pi * t_cur / t_len))

    def lr_for_step(self, step: int, base_lr: float | None = None) -> float:
        """LR used *by* iteration ``step`` (0-based): ``lr_at(max(step - 1, 0))``."""
        return self.lr_at(max(step - 1, 0), base_lr)

    def as_lambda(self) -> Callable[[int], float]:
        """Multiplier of ``lr`` for :class:`torch.optim.lr_scheduler.LambdaLR` (lag included).

        Equal to the reference up to float rounding and only for groups whose base LR is
        ``lr``; :func:`build_scheduler` is exact for any group.
        """
        return lambda step: self.lr_for_step(step) / self.lr


class WarmupLR(LRScheduler):
    """Torch scheduler for a :class:`WarmupSchedule`, stepped once per optimizer step.

    After construction every group's LR is ``lr_at(0)`` (iteration 0); after the k-th
    ``step()`` it is ``lr_at(k - 1)`` (iteration k), reproducing the reference exactly. Each
    group's peak is its LR at construction (``initial_lr``), so groups with scaled LRs
    (layer-wise decay) keep their ratio at the peak; warm-up and minimum LRs are shared.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: WarmupSchedule, last_epoch: int = -1
    ) -> None:
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """LRs for iteration ``last_epoch`` (the number of ``step()`` calls so far)."""
        return [self.schedule.lr_for_step(self.last_epoch, float(b)) for b in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (the schedule as a dict), so checkpoints load with weights_only."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
        sched = dataclasses.asdict(self.schedule)
        sched["milestones"] = list(sched["milestones"])
        state["schedule"] = sched
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        sched = state.pop("schedule", None)
        self.__dict__.update(state)
        if sched is not None:
            sched = dict(sched, milestones=tuple(sched["milestones"]))
            self.schedule = WarmupSchedule(**sched)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_iters: int,
    warmup_iters: int,
    warmup_lr: float,
    kind: Literal["multistep", "cosine"] = "multistep",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
    cosine_variant: Literal["simmim", "swin"] = "simmim",
) -> WarmupLR:
    """Per-iteration torch LR scheduler reproducing the reference schedule (spec 1.7).

    The peak LR of each group is its current ``lr`` (set it to the scaled LR before calling);
    ``warmup_lr`` / ``min_lr`` are absolute (already scaled). Call ``scheduler.step()`` after
    every ``optimizer.step()``. Iteration counts: ``warmup_iters = WARMUP_EPOCHS * N``,
    ``milestones = [700 * N]`` for the 800-epoch recipes (N iterations per epoch).
    """
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    schedule = WarmupSchedule(
        lr=max(lrs),
        warmup_lr=warmup_lr,
        warmup_iters=warmup_iters,
        total_iters=total_iters,
        kind=kind,
        milestones=tuple(milestones),
        gamma=gamma,
        min_lr=min_lr,
        cosine_variant=cosine_variant,
    )
    return WarmupLR(optimizer, schedule)


# ---------------------------------------------------------------------------------------------
# Depth fine-tuning (spec 2.5, 2.6): layer-wise LR decay and the triangle schedule.

#: Name substrings exempt from decay in the fine-tuning optimizer (spec 2.5); ``rpe_mlp`` is the
#: depth repository's name of timm's ``cpb_mlp``. 1-D tensors and ``.bias`` names come on top.
FINETUNE_NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "relative_position_bias_table",
    "cpb_mlp",
    "rpe_mlp",
    "logit_scale",
)

_LAYER_ZERO = ("patch_embed", "mask_token", "absolute_pos_embed")


def swin_num_layers(depths: Sequence[int]) -> int:
    """Number of layer-decay slots K (spec 2.5): one for the patch embedding, depth + 1 for
    each stage but the last (blocks + the next stage's patch merging), the last stage's blocks,
    and one for the final norm and the head. (2, 2, 18, 2) -> 1 + 3 + 3 + 19 + 2 + 1 = 29.
    """
    depths = [int(d) for d in depths]
    if not depths or any(d < 1 for d in depths):
        raise ConfigError(f"depths must be a non-empty list of positive ints, got {depths}")
    return sum(d + 1 for d in depths[:-1]) + depths[-1] + 2


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer-decay id of an encoder parameter in timm naming (spec 2.5 general rule).

    ``name`` is relative to the encoder (no ``encoder.`` prefix). With stage offsets
    o_0 = 0, o_s = o_{s-1} + depths[s-1] + 1: ``patch_embed*``, ``mask_token``,
    ``absolute_pos_embed`` -> 0; ``layers.s.blocks.b.*`` -> o_s + b + 1; ``layers.s.downsample.*``
    -> o_s (timm puts the patch merging at the *start* of stage s; the reference's
    ``layers.{s-1}.downsample`` gets the same id); anything else (``norm``, a head) -> K - 1
    (:func:`swin_num_layers`). For (2, 2, 18, 2): o = (0, 3, 6, 25), K = 29.
    """
    depths = [int(d) for d in depths]
    num_layers = swin_num_layers(depths)
    parts = name.split(".")
    if parts[0] in _LAYER_ZERO:
        return 0
    if parts[0] != "layers" or len(parts) < 3 or not parts[1].isdigit():
        return num_layers - 1
    stage = int(parts[1])
    if stage >= len(depths):
        raise ConfigError(f"{name}: stage {stage} does not exist for depths {depths}")
    offset = sum(d + 1 for d in depths[:stage])
    if parts[2] == "downsample":
        return offset
    if parts[2] == "blocks" and len(parts) > 3 and parts[3].isdigit():
        block = int(parts[3])
        if block >= depths[stage]:
            raise ConfigError(
                f"{name}: block {block} does not exist in stage {stage} of depth {depths[stage]}"
            )
        return offset + block + 1
    return num_layers - 1


def is_no_decay_finetune(
    name: str, param: torch.Tensor, keywords: Iterable[str] = FINETUNE_NO_DECAY_KEYWORDS
) -> bool:
    """Fine-tuning no-decay rule (spec 2.5): 1-D tensors, ``.bias`` names, and names containing
    any of ``keywords`` (substring match, as the reference does). An encoder's
    ``no_weight_decay("finetune")`` lists the names this exempts with the default keywords."""
    if param.ndim == 1 or name.endswith(".bias"):
        return True
    return any(k in name for k in keywords)


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    depths: Sequence[int],
    encoder_prefix: str = "encoder.",
    no_decay: Sequence[str] = FINETUNE_NO_DECAY_KEYWORDS,
) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise LR decay for depth fine-tuning (spec 2.5).

    Parameters named ``encoder_prefix + <timm name>`` get :func:`swin_layer_id` of the rest of
    the name; every other parameter (the head) gets K - 1. One group per (layer id, decay or
    not), in order of first appearance in ``named_parameters``; each carries ``lr_scale`` =
    ``layer_decay ** (K - 1 - id)`` (0.85 ** (28 - id) for Swin-v2-L), ``weight_decay``
    (``weight_decay`` or 0 per :func:`is_no_decay_finetune` with ``no_decay`` keywords),
    ``layer_id``, ``group_name`` (``layer_<id>_decay`` / ``_no_decay``) and ``names``. No ``lr``
    key: :class:`TriangleLR` sets ``lr(s) * lr_scale`` each step. Frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    num_layers = swin_num_layers(depths)
    keywords = tuple(no_decay)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if encoder_prefix and name.startswith(encoder_prefix):
            layer_id = swin_layer_id(name[len(encoder_prefix) :], depths)
        else:
            layer_id = num_layers - 1
        skip = is_no_decay_finetune(name, param, keywords)
        key = f"layer_{layer_id}_{'no_decay' if skip else 'decay'}"
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if skip else float(weight_decay),
                "lr_scale": float(layer_decay ** (num_layers - 1 - layer_id)),
                "layer_id": layer_id,
                "group_name": key,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


@dataclass(frozen=True)
class TriangleSchedule:
    """The fine-tuning "one-cycle" polynomial LR (spec 2.6, pitfall 12).

    N = ``iters_per_epoch``, E = ``epochs``, T = N floor(E / 2); global step s counts from 1 and
    ``lr_at(s)`` is the LR iteration s runs at:

    - s < T: (max_lr - min_lr) (s / T)^power + min_lr (ramp up);
    - s >= T: max(min_lr, max_lr - (max_lr - min_lr) (s / T - 1)^power) (ramp down, clamped;
      flat at min_lr from s = 2T on, so with odd E the last epoch is flat).

    s / T is evaluated as ``s / N / floor(E/2)`` like the reference, so values agree to the
    last bit. E = 1 (T = 0) is rejected: the reference divides by zero.
    """

    max_lr: float
    min_lr: float
    iters_per_epoch: int
    epochs: int
    power: float = 0.9

    def __post_init__(self) -> None:
        if self.iters_per_epoch < 1 or self.epochs < 2:
            raise ConfigError(
                f"triangle schedule needs iters_per_epoch >= 1 and epochs >= 2 (T = N floor(E/2) "
                f"must be > 0), got {self.iters_per_epoch}, {self.epochs}"
            )
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ConfigError(
                f"triangle schedule needs 0 <= min_lr <= max_lr, got {self.min_lr}, {self.max_lr}"
            )

    @property
    def half_epochs(self) -> int:
        """floor(E / 2): epochs of the ramp up."""
        return self.epochs // 2

    @property
    def peak_step(self) -> int:
        """T = N floor(E / 2), the step at max_lr."""
        return self.iters_per_epoch * self.half_epochs

    @property
    def total_steps(self) -> int:
        """N E, the number of optimizer steps of the run."""
        return self.iters_per_epoch * self.epochs

    def lr_at(self, s: int) -> float:
        """LR of global step ``s`` (1-based), before any layer scale."""
        if s < 1:
            raise ConfigError(f"global step counts from 1, got {s}")
        ratio = s / self.iters_per_epoch / self.half_epochs
        if s < self.peak_step:
            return (self.max_lr - self.min_lr) * ratio**self.power + self.min_lr
        return max(
            self.min_lr, (self.min_lr - self.max_lr) * (ratio - 1) ** self.power + self.max_lr
        )


class TriangleLR(LRScheduler):
    """Torch scheduler for a :class:`TriangleSchedule` with per-group ``lr_scale`` (spec 2.6).

    Each group's LR is ``lr_at(s) * group.get("lr_scale", 1.0)``. After construction the LRs are
    those of step s = 1; call ``scheduler.step()`` after every ``optimizer.step()``, so that the
    LR of step s is in place before its forward pass, as the reference sets it. ``last_epoch``
    counts completed steps (s - 1). Base LRs (``initial_lr``) are ignored.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: TriangleSchedule, last_epoch: int = -1
    ) -> None:
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """LRs for global step ``last_epoch + 1``."""
        lr = self.schedule.lr_at(self.last_epoch + 1)
        return [lr * float(g.get("lr_scale", 1.0)) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (the schedule as a dict), so checkpoints load with weights_only."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
        state["schedule"] = dataclasses.asdict(self.schedule)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        sched = state.pop("schedule", None)
        self.__dict__.update(state)
        if sched is not None:
            self.schedule = TriangleSchedule(**sched)
