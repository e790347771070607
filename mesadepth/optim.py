"""Weight-decay parameter groups, linear LR scaling and the per-iteration warm-up schedules.

Specification: masked-pretraining-and-finetuning.md sections 1.6 (no-decay rule), 1.7 (linear
scaling, warm-up, multistep / cosine) and pitfalls 5, 6, 19.

Schedule convention (spec 1.7, pitfall 19). ``lr(t)`` is the value the reference sets *after*
optimizer step ``t`` (``step_update(e * N + i)``), so iteration ``t + 1`` runs at ``lr(t)``,
and iteration 0 runs at ``lr(0)`` = the warm-up LR too: the first two iterations share it. The
torch scheduler from :func:`build_scheduler` reproduces this when ``scheduler.step()`` is called
once after every ``optimizer.step()``.
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
    "INTENDED_SKIP_KEYWORDS",
    "REFERENCE_SKIP_NAMES",
    "WarmupLR",
    "WarmupSchedule",
    "build_scheduler",
    "is_no_decay",
    "param_groups_no_decay",
    "scaled_lr",
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
