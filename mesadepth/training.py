"""The one place that builds a Lightning ``Trainer``: devices, DDP, precision, logs, checkpoints, resume.

Every stage (masked, geometric, supervised pre-training and fine-tuning) trains through
:func:`fit` (or :func:`build_trainer` plus ``trainer.fit``), so every run directory looks the
same (see ``DESIGN.md``)::

    RUN/checkpoints/last.ckpt   full training state, rewritten atomically (AtomicModelCheckpoint)
    RUN/logs/                   TensorBoard event files (one folder; a resumed run appends to it)
    RUN/model.safetensors       exported weights (export_weights)
    RUN/metrics.json            what the run measured (write_metrics, merged across calls)

**The training_step convention.** A stage's ``training_step`` returns either the total loss
tensor or a mapping::

    {"loss": total, "terms": {"photo": photo, "smooth": smooth, ...}}

``loss`` is what Lightning back-propagates; ``terms`` are the named scalars it is made of,
*detached* (``t.detach()``: Lightning hands the mapping to the callbacks after the backward
pass and has no use for their graphs). A stage that also wants the terms in TensorBoard logs
them as ``train/<name>`` with ``on_step=True``. :class:`NonFiniteGuard` checks, after every
batch, the total loss, every returned term and every value logged on this step under
``train/``; the first NaN or inf stops the run with :class:`NonFiniteLossError`, e.g.
``step 17: loss term 'photo' is nan``, before the checkpoint of that step is written.

**Resume.** :func:`fit` with ``resume="auto"`` continues from ``RUN/checkpoints/last.ckpt``
when it exists: weights, optimizer, LR schedulers, loop counters (Lightning), plus the global
RNG states and the position in the data (:class:`ResumeState`). Lightning restores the loop
counters of an interrupted epoch but restarts a plain DataLoader from the epoch's first batch
while counting on from the restored batch index, so the epoch replays its first batches and
never sees its last ones. :class:`ResumableRandomSampler` fixes that: its order depends only
on ``(seed, epoch)``, and :class:`ResumeState` tells it how many of this epoch's samples the
checkpoint had already consumed. A training DataLoader must therefore use a
:class:`ResumableRandomSampler` (and ``batch_size``, not a custom batch sampler) for a killed
run to continue with exactly the same batches; exactness also needs any randomness inside
``Dataset.__getitem__`` to be seeded per sample, because worker processes are restarted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, Checkpoint, TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import BatchSampler
from torch.utils.data.distributed import DistributedSampler

from mesadepth.config import deep_merge
from mesadepth.errors import ConfigError, DataError, MesaError, MissingFileError
from mesadepth.io import atomic_path, atomic_write_text

PathLike = str | os.PathLike[str]

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOG_DIR = "logs"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


# --------------------------------------------------------------------------------------------
# The recipe section.


@dataclass
class TrainerConfig:
    """How to train: hardware, precision, length, logging, checkpoints and determinism."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = field(
        default="auto",
        metadata={"help": "hardware to train on; auto picks a GPU when there is one"},
    )
    devices: int | Literal["auto"] = field(
        default="auto",
        metadata={"help": "devices per node (-1 = all, auto = all of the accelerator)"},
    )
    num_nodes: int = field(default=1, metadata={"help": "machines in a multi-node DDP run"})
    strategy: Literal[
        "auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "ddp_notebook", "fsdp"
    ] = field(
        default="auto",
        metadata={
            "help": "distribution; ddp for several devices, ddp_find_unused_parameters_true when "
            "some parameters get no gradient on a step"
        },
    )
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"] = (
        field(default="32-true", metadata={"help": "numeric precision (bf16-mixed on recent GPUs)"})
    )
    max_epochs: int | None = field(
        default=None, metadata={"help": "stop after this many epochs (null: max_steps decides)"}
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "stop after this many optimizer steps (-1: max_epochs decides)"},
    )
    accumulate_grad_batches: int = field(
        default=1,
        metadata={"help": "batches whose gradients are summed before each optimizer step"},
    )
    gradient_clip_val: float | None = field(
        default=None,
        metadata={"help": "clip gradients at this value (null: no clipping; SimMIM uses 5.0)"},
    )
    gradient_clip_algorithm: Literal["norm", "value"] = field(
        default="norm",
        metadata={"help": "norm: one global L2 norm over all parameters; value: each element"},
    )
    log_every_n_steps: int = field(default=50, metadata={"help": "TensorBoard logging interval"})
    val_check_interval: int | float = field(
        default=1.0,
        metadata={"help": "validate every N batches (int) or fraction of an epoch (float)"},
    )
    check_val_every_n_epoch: int | None = field(
        default=1,
        metadata={"help": "validate every N epochs (null: only val_check_interval decides)"},
    )
    checkpoint_every_n_steps: int = field(
        default=0,
        metadata={
            "help": "also rewrite checkpoints/last.ckpt every N optimizer steps (0: at the end of "
            "each epoch and of training only)"
        },
    )
    deterministic: bool = field(
        default=False,
        metadata={"help": "deterministic algorithms (warn where none exists); slower on GPU"},
    )
    seed: int = field(default=0, metadata={"help": "global seed (python, numpy, torch, workers)"})
    sync_batchnorm: bool = field(
        default=False, metadata={"help": "synchronise BatchNorm statistics across DDP processes"}
    )
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    num_sanity_val_steps: int = field(
        default=2, metadata={"help": "validation batches run before training (-1: all)"}
    )
    limit_train_batches: int | float = field(
        default=1.0, metadata={"help": "train batches per epoch: a count (int) or a fraction"}
    )
    limit_val_batches: int | float = field(
        default=1.0, metadata={"help": "validation batches: a count (int) or a fraction"}
    )

    def __post_init__(self) -> None:
        # Range checks here, so a bad recipe fails when it is loaded, not minutes into a run.
        if self.devices != "auto" and (self.devices == 0 or self.devices < -1):
            raise ConfigError(f"devices must be >= 1, -1 (all) or 'auto', got {self.devices}")
        for name in ("num_nodes", "accumulate_grad_batches", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_epochs is not None and (self.max_epochs == 0 or self.max_epochs < -1):
            raise ConfigError(f"max_epochs must be >= 1, -1 or null, got {self.max_epochs}")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ConfigError(f"max_steps must be >= 1 or -1, got {self.max_steps}")
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ConfigError(
                f"gradient_clip_val must be > 0 or null, got {self.gradient_clip_val}"
            )
        if self.checkpoint_every_n_steps < 0:
            raise ConfigError(
                f"checkpoint_every_n_steps must be >= 0, got {self.checkpoint_every_n_steps}"
            )
        if self.num_sanity_val_steps < -1:
            raise ConfigError(
                f"num_sanity_val_steps must be >= -1, got {self.num_sanity_val_steps}"
            )
        if self.check_val_every_n_epoch is not None and self.check_val_every_n_epoch < 1:
            raise ConfigError(
                f"check_val_every_n_epoch must be >= 1 or null, got {self.check_val_every_n_epoch}"
            )
        if not self.val_check_interval > 0:
            raise ConfigError(f"val_check_interval must be > 0, got {self.val_check_interval}")
        for name in ("limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            if value < 0 or (isinstance(value, float) and value > 1.0):
                raise ConfigError(f"{name} must be an int >= 0 or a float in [0, 1], got {value}")


def seed_run(cfg: TrainerConfig) -> None:
    """Seed python, numpy and torch (and DataLoader workers) and apply ``cfg.deterministic``.

    :func:`build_trainer` calls it; call it yourself before building the model too, so that
    the weights' initialisation is reproducible as well.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.deterministic:
        # cuBLAS needs this workspace setting for reproducible GEMMs; it must be set before the
        # first cuBLAS call, which is why it is set here and not only by the Trainer.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------
# Checkpoints written atomically.


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, fsync, then ``os.replace``.

    Lightning's own writer truncates the target and writes it in place, so a kill during the
    save of a multi-GB checkpoint leaves a half-written ``last.ckpt`` and nothing to resume
    from. Here the previous file stays intact until the new one is complete on disk. Remote
    (fsspec) paths fall back to Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)


class AtomicModelCheckpoint(Checkpoint):
    """Keep one full training-state checkpoint, ``DIR/last.ckpt``, up to date.

    It is rewritten every ``every_n_steps`` optimizer steps (0: only at epoch ends), after the
    last batch of every epoch and at the end of training; never twice for the same global
    step, never during the sanity check, never after an exception (the state may be the
    cause). Lightning orders checkpoint callbacks last, so :class:`NonFiniteGuard` has
    already checked the step. Atomicity comes from :class:`AtomicCheckpointIO`, which
    :func:`build_trainer` installs.

    The end-of-epoch save happens on the epoch's last batch, before any end-of-epoch
    validation, not in ``on_train_epoch_end``: Lightning 2.6 resumes a ``max_steps`` run from
    an ``on_train_epoch_end`` checkpoint wrongly (it trains one extra batch of the finished
    epoch and counts epochs one behind), while it resumes from a last-batch checkpoint
    exactly. The validation of that epoch is not repeated on resume.

    This is a small :class:`~lightning.pytorch.callbacks.Checkpoint` rather than a configured
    ``ModelCheckpoint``, whose ``save_last``/``save_top_k``/``every_n_*`` combinations either
    keep a second file per save or save in ``on_train_epoch_end``.
    """

    def __init__(self, dirpath: PathLike, every_n_steps: int = 0, filename: str = LAST_CHECKPOINT):
        super().__init__()
        if every_n_steps < 0:
            raise ConfigError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.filename = filename
        self._last_saved_step: int | None = None

    @property
    def path(self) -> Path:
        """Where the checkpoint is written."""
        return self.dirpath / self.filename

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.global_step == self._last_saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_saved_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if last_batch or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


# --------------------------------------------------------------------------------------------
# NaN / inf guard.


class NonFiniteLossError(MesaError, FloatingPointError):
    """The loss, one of its terms or a logged training value is NaN or inf."""

    def __init__(self, step: int, message: str) -> None:
        self.step = step
        super().__init__(message)


def _as_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    return None


def _describe_bad(t: Tensor) -> str:
    if t.numel() == 1:
        return str(t.item())  # nan, inf or -inf
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    return f"non-finite ({n_nan} nan, {n_inf} inf of {t.numel()} values)"


class NonFiniteGuard(Callback):
    """Stop training at the first NaN or inf loss, loss term or logged ``train/`` value.

    Checks the ``training_step`` output (``loss`` and ``terms``, see the module docstring) and
    every value logged on this step whose name starts with ``logged_prefix``. The error names
    the global step and the culprit(s): ``step 17: loss term 'photo' is nan``. Terms are
    listed before the total, because a NaN term makes the total NaN too. In a multi-process
    run every process learns of a failure on any other (one tiny all-reduce per step), so no
    process is left waiting in the next gradient all-reduce.
    """

    def __init__(self, logged_prefix: str = "train/") -> None:
        super().__init__()
        self.logged_prefix = logged_prefix
        self._step = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The step this batch belongs to: by on_train_batch_end the optimizer has stepped and
        # global_step already points at the next one.
        self._step = trainer.global_step

    def _named_values(self, trainer: L.Trainer, outputs: Any) -> list[tuple[str, Tensor]]:
        named: list[tuple[str, Tensor]] = []
        loss = None
        if isinstance(outputs, Tensor):
            loss = outputs
        elif isinstance(outputs, Mapping):
            loss = outputs.get("loss")
            terms = outputs.get("terms")
            if isinstance(terms, Mapping):
                for name, value in terms.items():
                    t = _as_tensor(value)
                    if t is not None:
                        named.append((f"loss term '{name}'", t))
        if self.logged_prefix:
            for key, value in trainer.callback_metrics.items():
                if key.startswith(self.logged_prefix):
                    t = _as_tensor(value)
                    if t is not None:
                        named.append((f"logged value '{key}'", t))
        t = _as_tensor(loss)
        if t is not None:
            named.append(("loss", t))
        return named

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        named = self._named_values(trainer, outputs)
        bad: list[str] = []
        if named:
            device = named[-1][1].device
            finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
            # One device sync per step; the per-value report is built only on failure.
            if not bool(finite.all()):
                bad = [
                    f"{label} is {_describe_bad(t)}"
                    for (label, t), ok in zip(named, finite, strict=True)
                    if not ok
                ]
        failed = bool(bad)
        if trainer.world_size > 1:
            failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
        if not failed:
            return
        where = f"step {self._step}"
        if not bad:
            raise NonFiniteLossError(
                self._step,
                f"{where}: a loss value is NaN/inf on another process (see its error); "
                f"stopping rank {trainer.global_rank} too",
            )
        context = f" (epoch {trainer.current_epoch}, batch {batch_idx})"
        raise NonFiniteLossError(self._step, f"{where}: " + "; ".join(bad) + context)


# --------------------------------------------------------------------------------------------
# A sampler whose order is a pure function of (seed, epoch).


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed from ``(seed, epoch)``; hashing avoids ``seed + epoch`` collisions."""
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableRandomSampler(DistributedSampler):
    """Random order that depends only on ``(seed, epoch)``, sharded across DDP ranks, resumable.

    Each epoch draws ``num_samples`` indices (default ``n``) from ``range(n)``: a permutation
    without replacement (several, concatenated, when ``num_samples > n``), or independent
    draws with replacement. With ``W`` processes the epoch's order is padded by repeating its
    start (or cut with ``drop_last``) to a multiple of ``W``, like ``DistributedSampler``, and
    rank ``r`` takes positions ``r, r + W, r + 2W, ...``. This interleaving makes the ``t``-th
    batches of all ranks (batch size ``B`` each) together exactly the ``t``-th batch of one
    process with batch size ``B * W`` over the same order.

    ``num_replicas`` and ``rank`` default to the initialised process group, looked up when
    the sampler is iterated (so a sampler built before DDP starts still shards correctly).
    Lightning calls :meth:`set_epoch`; :class:`ResumeState` calls :meth:`set_start` when a run
    resumes mid-epoch. ``len()`` is always this rank's full epoch, also when a start is set,
    because Lightning counts an epoch's batches from it and offsets the restored progress.

    It subclasses ``DistributedSampler`` only so Lightning's DDP setup, which swaps any other
    sampler for its own distributed one, leaves it in place; it does not use the parent's
    state. ``num_samples`` and ``total_size`` attributes have the parent's meaning (this
    rank's count, the padded epoch length); the constructor's ``num_samples`` is
    :attr:`epoch_size`.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        num_samples: int | None = None,
        replacement: bool = False,
        *,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ is skipped on purpose: it needs a process group now.
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"ResumableRandomSampler: n must be a positive int, got {n!r}")
        if num_samples is not None and num_samples < 1:
            raise ConfigError(
                f"ResumableRandomSampler: num_samples must be >= 1, got {num_samples}"
            )
        if num_replicas is not None and num_replicas < 1:
            raise ConfigError(
                f"ResumableRandomSampler: num_replicas must be >= 1, got {num_replicas}"
            )
        self.n = n
        self.seed = int(seed)
        self.epoch_size = n if num_samples is None else int(num_samples)
        self.replacement = replacement
        self.drop_last = drop_last
        self.shuffle = True
        self.epoch = 0
        self._num_replicas = num_replicas
        self._rank = rank
        self._start = 0
        self._start_epoch: int | None = None

    # DistributedSampler's attributes, computed because the process group may start later.
    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return self._num_replicas if self._num_replicas is not None else _dist_info()[0]

    @property
    def rank(self) -> int:  # type: ignore[override]
        rank = self._rank if self._rank is not None else _dist_info()[1]
        if not 0 <= rank < self.num_replicas:
            raise ConfigError(
                f"ResumableRandomSampler: rank {rank} outside [0, {self.num_replicas})"
            )
        return rank

    @property
    def total_size(self) -> int:  # type: ignore[override]
        """Length of the epoch's order after padding (or cutting) to a multiple of the ranks."""
        return self.num_samples * self.num_replicas

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Indices this rank yields per epoch."""
        w = self.num_replicas
        if self.drop_last:
            if self.epoch_size < w:
                raise ConfigError(
                    f"ResumableRandomSampler: drop_last with {self.epoch_size} samples and {w} "
                    "ranks leaves no sample for a rank"
                )
            return self.epoch_size // w
        return math.ceil(self.epoch_size / w)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = int(epoch)

    def set_start(self, start: int, epoch: int | None = None) -> None:
        """Make the next iteration over ``epoch`` (default: the current) skip its first ``start`` indices.

        ``start`` counts this rank's indices (batches consumed x batch size). It is used once,
        and dropped if the next iteration is over another epoch.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self._start = int(start)
        self._start_epoch = self.epoch if epoch is None else int(epoch)

    def epoch_order(self, epoch: int) -> Tensor:
        """The whole epoch's order over all ranks (``total_size`` indices), before sharding."""
        g = torch.Generator()
        g.manual_seed(_epoch_seed(self.seed, epoch))
        if self.replacement:
            order = torch.randint(self.n, (self.epoch_size,), generator=g, dtype=torch.int64)
        else:
            reps = math.ceil(self.epoch_size / self.n)
            order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])
            order = order[: self.epoch_size]
        total = self.total_size
        if total > order.numel():
            reps = math.ceil(total / order.numel())
            order = order.repeat(reps)
        return order[:total]

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        start = self._start if self._start_epoch == epoch else 0
        self._start, self._start_epoch = 0, None
        shard = self.epoch_order(epoch)[self.rank :: self.num_replicas]
        return iter(shard[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples


# --------------------------------------------------------------------------------------------
# Resume: data position and RNG states.


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return [x for v in obj.values() for x in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _flatten(v)]
    return [obj]


def _resumable_sampler(loader: Any) -> tuple[ResumableRandomSampler | None, int | None]:
    """The loader's :class:`ResumableRandomSampler` and batch size, or ``(None, None)``."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, ResumableRandomSampler):
        sampler = getattr(batch_sampler, "sampler", None)
    if not isinstance(sampler, ResumableRandomSampler):
        return None, None
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is None and type(batch_sampler) is BatchSampler:
        batch_size = batch_sampler.batch_size
    return sampler, batch_size


def _capture_rng() -> dict[str, Any]:
    # Tensors and plain Python values only, so the checkpoint also loads with weights_only=True.
    # The legacy global numpy RNG is the one seed_everything seeds and datasets commonly use.
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, key, pos, has_gauss, gauss = state["numpy"]
        key = np.asarray(key, dtype=np.int64).astype(np.uint32)
        np.random.set_state((kind, key, pos, has_gauss, gauss))  # noqa: NPY002
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class ResumeState(Callback):
    """Put the data position and the RNG states back where the checkpoint left them.

    Lightning restores weights, optimizers, schedulers and loop counters. This adds (a) the
    global RNG states (python, numpy, torch, current CUDA device) at the moment of the save,
    restored just before training continues, so dropout, drop-path and random masks repeat
    the uninterrupted run; in DDP every rank gets rank 0's states, as Lightning seeds all
    ranks alike; and (b) for every training DataLoader with a :class:`ResumableRandomSampler`,
    the epoch and the number of samples of it already consumed, derived from the restored
    loop counters, so the interrupted epoch continues with its next batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rng: Mapping[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        # The numbers Lightning itself uses right after this hook: set_epoch(epoch) and a batch
        # count that continues from the restored progress. A finished epoch restarts at 0.
        epoch = fit_loop.epoch_progress.current.processed
        done = fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            done = 0
        adjusted = False
        for loader in _flatten(trainer.train_dataloader):
            sampler, batch_size = _resumable_sampler(loader)
            if sampler is None:
                if done > 0:
                    warnings.warn(
                        f"resuming in the middle of epoch {epoch} (after {done} batches) with a "
                        "training DataLoader that has no ResumableRandomSampler: its epoch restarts "
                        "from the first batch and is cut short, so the run does not continue as "
                        "it would have without the interruption",
                        stacklevel=2,
                    )
                continue
            if done > 0 and batch_size is None:
                raise MesaError(
                    "cannot resume mid-epoch: the training DataLoader has a ResumableRandomSampler "
                    "but no batch_size (a custom batch_sampler); give it batch_size instead"
                )
            sampler.set_epoch(epoch)
            sampler.set_start(done * (batch_size or 0), epoch)
            adjusted = True
        rng, self._rng = self._rng, None
        # Lightning created the data iterator before this hook: with worker processes it has
        # already drawn indices from the sampler's old state, so it is created again. Creating
        # one draws a base seed from the torch RNG, so the order of the two steps follows the
        # uninterrupted run: mid-epoch nothing was drawn between the save and the next batch,
        # at an epoch start the epoch's iterator was created after the save.
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if done > 0:
            if adjusted and fetcher is not None:
                iter(fetcher)
            if rng is not None:
                _restore_rng(rng)
        elif rng is not None:
            _restore_rng(rng)
            if fetcher is not None:
                iter(fetcher)


# --------------------------------------------------------------------------------------------
# Building and running the trainer.


def checkpoint_path(run_dir: PathLike) -> Path:
    """``RUN/checkpoints/last.ckpt``."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def build_trainer(
    cfg: TrainerConfig,
    run_dir: PathLike,
    callbacks: Iterable[Callback] = (),
    logger: bool | Logger | Sequence[Logger] = True,
) -> L.Trainer:
    """A ``lightning.Trainer`` for ``cfg`` writing into ``run_dir``; seeds the run first.

    Installs TensorBoard logging to ``RUN/logs`` (``logger=True``; ``False`` for none, or
    your own loggers), a tqdm progress bar when ``cfg.progress_bar``, :class:`ResumeState`,
    :class:`NonFiniteGuard`, :class:`AtomicModelCheckpoint` on ``RUN/checkpoints/last.ckpt``
    with :class:`AtomicCheckpointIO`, then ``callbacks``.
    """
    if cfg.max_epochs is None and cfg.max_steps == -1:
        # Lightning would silently train for 1000 epochs.
        raise ConfigError("set max_epochs or max_steps: neither is set, the run would not end")
    run_dir = Path(run_dir)
    seed_run(cfg)
    if logger is True:
        loggers: bool | Logger | list[Logger] = [
            TensorBoardLogger(save_dir=run_dir, name=LOG_DIR, version="", default_hp_metric=False)
        ]
    elif logger is False or logger is None:
        loggers = False
    elif isinstance(logger, Logger):
        loggers = [logger]
    else:
        loggers = list(logger)
    all_callbacks: list[Callback] = [ResumeState(), NonFiniteGuard(), *callbacks]
    if cfg.progress_bar:
        all_callbacks.append(TQDMProgressBar())
    all_callbacks.append(
        AtomicModelCheckpoint(run_dir / CHECKPOINT_DIR, every_n_steps=cfg.checkpoint_every_n_steps)
    )
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        gradient_clip_algorithm=cfg.gradient_clip_algorithm if cfg.gradient_clip_val else None,
        log_every_n_steps=cfg.log_every_n_steps,
        val_check_interval=cfg.val_check_interval,
        check_val_every_n_epoch=cfg.check_val_every_n_epoch,
        num_sanity_val_steps=cfg.num_sanity_val_steps,
        limit_train_batches=cfg.limit_train_batches,
        limit_val_batches=cfg.limit_val_batches,
        # "warn": deterministic kernels where they exist, a warning (not an error) elsewhere;
        # False (not None) so a deterministic run earlier in this process does not leak in.
        deterministic="warn" if cfg.deterministic else False,
        sync_batchnorm=cfg.sync_batchnorm,
        enable_progress_bar=cfg.progress_bar,
        enable_checkpointing=True,
        default_root_dir=run_dir,
        plugins=[AtomicCheckpointIO()],
        callbacks=all_callbacks,
        logger=loggers,
    )


def resolve_resume(run_dir: PathLike, resume: str | os.PathLike[str] = "auto") -> Path | None:
    """The checkpoint to resume from: ``"auto"`` (``last.ckpt`` if present), ``"never"``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        last = checkpoint_path(run_dir)
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise MissingFileError(
            path, "checkpoint to resume from", "a .ckpt written by a previous run, or resume=auto"
        )
    return path


def fit(
    module: L.LightningModule,
    datamodule_or_loaders: Any,
    cfg: TrainerConfig,
    run_dir: PathLike,
    resume: str | os.PathLike[str] = "auto",
    *,
    callbacks: Iterable[Callback] = (),
    logger: bool | Logger | Sequence[Logger] = True,
) -> L.Trainer:
    """Train ``module`` into ``run_dir``; continue from ``RUN/checkpoints/last.ckpt`` when present.

    ``datamodule_or_loaders`` is a ``LightningDataModule``, a training DataLoader, a
    ``(train, val)`` pair, a ``{"train": ..., "val": ...}`` mapping, or None when the module
    defines its own loaders. ``resume``: ``"auto"``, ``"never"`` (start over; ``last.ckpt``
    will be overwritten) or a checkpoint path. Returns the trainer (``trainer.callback_metrics``
    holds the last logged values). Seed and build the module after :func:`seed_run` for a
    reproducible initialisation.
    """
    ckpt = resolve_resume(run_dir, resume)
    trainer = build_trainer(cfg, run_dir, callbacks=callbacks, logger=logger)
    train: Any = None
    val: Any = None
    datamodule: L.LightningDataModule | None = None
    data = datamodule_or_loaders
    if isinstance(data, L.LightningDataModule):
        datamodule = data
    elif isinstance(data, Mapping):
        unknown = set(data) - {"train", "val"}
        if unknown:
            raise ConfigError(
                f"fit: data mapping takes keys 'train' and 'val', got {sorted(unknown)}"
            )
        train, val = data.get("train"), data.get("val")
    elif isinstance(data, tuple) and len(data) == 2:
        train, val = data
    else:
        train = data
    # Checkpoints are loaded without executing pickled code (torch's weights_only loader):
    # everything a stage saves (hyperparameters, RNG states, schedules) is tensors and plain
    # Python values, so this costs nothing and a tampered .ckpt cannot run code.
    trainer.fit(
        module,
        train_dataloaders=train,
        val_dataloaders=val,
        datamodule=datamodule,
        ckpt_path=ckpt,
        weights_only=True,
    )
    return trainer


# --------------------------------------------------------------------------------------------
# Run outputs.


def _global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def export_weights(
    path: PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``tensors`` as a safetensors file (e.g. ``RUN/model.safetensors``), atomically.

    Tensors are moved to the CPU; entries that share memory (tied weights) are copied, which
    safetensors requires. ``metadata`` values that are not strings are stored as JSON. Only
    global rank 0 writes, so the same code may run on every DDP process.
    """
    path = Path(path)
    if _global_rank() != 0:
        return path
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"export_weights: '{name}' is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[name] = t
    meta = {"format": "pt"}
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    _fsync_dir(path.parent)
    return path


def _jsonable(value: Any, key: str) -> Any:
    """Metric values as JSON: tensors and numpy values as numbers/lists, NaN/inf as null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.ndarray, np.generic)):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"write_metrics: '{key}' is a {type(value).__name__}, not a number or text")


def write_metrics(run_dir: PathLike, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``metrics`` into ``RUN/metrics.json`` (nested mappings merged) and write it atomically.

    Tensors and numpy values become numbers (lists for arrays); NaN and inf become ``null``
    so the file stays strict JSON. Returns the file's new contents. Only global rank 0 reads
    and writes; other ranks return ``metrics`` converted, without touching the file.
    """
    new = _jsonable(metrics, "")
    if _global_rank() != 0:
        return new
    path = Path(run_dir) / METRICS_FILE
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(path, f"expected a JSON object of metrics: {exc}") from None
        if not isinstance(existing, dict):
            raise DataError(
                path, f"expected a JSON object of metrics, found a {type(existing).__name__}"
            )
    merged = deep_merge(existing, new)
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return merged


__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "ResumableRandomSampler",
    "ResumeState",
    "TrainerConfig",
    "build_trainer",
    "checkpoint_path",
    "export_weights",
    "fit",
    "resolve_resume",
    "seed_run",
    "write_metrics",
]


def read_metrics(run_dir: PathLike) -> dict[str, Any]:
    """``RUN/metrics.json`` as written by :func:`write_metrics` (empty dict when absent)."""
    import json

    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
