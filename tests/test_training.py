"""The Trainer factory: config, training, atomic checkpoints, NaN guard, exact resume, DDP."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mesadepth import training
from mesadepth.config import describe, load_config
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.training import (
    AtomicCheckpointIO,
    NonFiniteLossError,
    ResumableRandomSampler,
    TrainerConfig,
    build_trainer,
    checkpoint_path,
    export_weights,
    fit,
    seed_run,
    write_metrics,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`"),
]

N_SAMPLES = 40
TESTS_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# A tiny model on a fixed synthetic dataset.


def regression_data() -> TensorDataset:
    """y = x @ w + small noise, with each sample's index so tests can see the data order."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, 4, generator=g)
    w = torch.tensor([[1.5], [-2.0], [0.5], [3.0]])
    y = x @ w + 0.05 * torch.randn(N_SAMPLES, 1, generator=g)
    return TensorDataset(x, y, torch.arange(N_SAMPLES))


class TinyRegression(L.LightningModule):
    """Linear regression with a per-step LR schedule, following the training_step convention.

    ``noise`` adds input noise from the global torch RNG (so exact resume needs the RNG
    restored); ``bad_at`` injects a NaN/inf into one place at one global step.
    """

    def __init__(
        self,
        lr: float = 0.05,
        optimizer: str = "sgd",
        noise: float = 0.0,
        bad_at: tuple[int, str] | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.lr = lr
        self.optimizer = optimizer
        self.noise = noise
        self.bad_at = bad_at
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def training_step(
        self, batch: list[torch.Tensor], batch_idx: int
    ) -> torch.Tensor | dict[str, Any]:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        pred = self.net(x)
        mse = F.mse_loss(pred, y)
        l1 = (pred - y).abs().mean().detach()
        self.losses.append(float(mse.detach()))
        where = self.bad_at[1] if self.bad_at and self.bad_at[0] == self.global_step else None
        if where == "term":
            l1 = torch.tensor(float("nan"))
        self.log("train/mse", float("inf") if where == "logged" else mse.detach(), on_step=True)
        if where == "loss":
            return mse * float("nan")  # a bare tensor: the guard must still read it
        return {"loss": mse, "terms": {"mse": mse.detach(), "l1": l1}}

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val/mse", F.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(batch_size: int = 4, seed: int = 7, num_workers: int = 0, **sampler_kw) -> DataLoader:
    ds = regression_data()
    sampler = ResumableRandomSampler(len(ds), seed=seed, **sampler_kw)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


def quick_cfg(**kw) -> TrainerConfig:
    base = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        progress_bar=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        deterministic=True,
        seed=3,
    )
    base.update(kw)
    return TrainerConfig(**base)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Killed(Exception):
    """Stands in for a SIGKILL: KeyboardInterrupt would make Lightning call sys.exit."""


class KillAt(Callback):
    """Crash at the end of global step ``step``, before that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            raise _Killed(f"killed after step {self.step}")


@pytest.fixture(autouse=True)
def _restore_global_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Deterministic mode and seed_everything change process-wide state; undo it per test."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


# --------------------------------------------------------------------------------------------
# The recipe.


def test_config_loads_yaml_with_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "trainer.yaml"
    recipe.write_text("max_steps: 1000\ngradient_clip_val: 5\nval_check_interval: 500\n")
    cfg = load_config(TrainerConfig, recipe, ["precision=bf16-mixed", "devices=2"])
    assert cfg.precision == "bf16-mixed"
    assert cfg.devices == 2 and cfg.max_steps == 1000
    assert cfg.gradient_clip_val == 5.0 and isinstance(cfg.gradient_clip_val, float)
    assert cfg.val_check_interval == 500 and isinstance(cfg.val_check_interval, int)
    cfg = load_config(TrainerConfig, None, ["val_check_interval=0.25", "devices=auto"])
    assert cfg.val_check_interval == 0.25 and cfg.devices == "auto"
    assert "SimMIM uses 5.0" in describe(TrainerConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("precision=fp16", "one of"),
        ("strategy=horovod", "one of"),
        ("devices=0", "devices"),
        ("accumulate_grad_batches=0", "accumulate_grad_batches"),
        ("gradient_clip_val=-1", "gradient_clip_val"),
        ("limit_train_batches=1.5", "limit_train_batches"),
        ("max_steps=0", "max_steps"),
    ],
)
def test_config_refuses_invalid_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TrainerConfig, None, [override])


def test_build_trainer_needs_an_end(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_epochs or max_steps"):
        build_trainer(TrainerConfig(), tmp_path)


def test_build_trainer_wires_the_config(tmp_path: Path) -> None:
    cfg = quick_cfg(gradient_clip_val=5.0, accumulate_grad_batches=2, progress_bar=True)
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.gradient_clip_val == 5.0
    assert trainer.gradient_clip_algorithm == "norm"
    assert trainer.accumulate_grad_batches == 2
    assert Path(trainer.logger.log_dir).resolve() == (tmp_path / "logs").resolve()
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, TQDMProgressBar) for c in trainer.callbacks)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    quiet = build_trainer(quick_cfg(deterministic=False), tmp_path / "b", logger=False)
    assert not any(isinstance(c, TQDMProgressBar) for c in quiet.callbacks)
    assert quiet.logger is None
    assert not torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------------------------
# Training.


@pytest.mark.learning(seed=3)
def test_loss_falls_and_run_dir_is_filled(
    tmp_path: Path, learning_seed: int, learning_record: dict
) -> None:
    cfg = quick_cfg(max_steps=30, seed=learning_seed)
    seed_run(cfg)
    module = TinyRegression(lr=0.2, optimizer="adam")
    val = DataLoader(regression_data(), batch_size=8)
    # The sampler's seed, distinct from the model's (7 by default).
    trainer = fit(module, (loader(seed=learning_seed + 4), val), cfg, tmp_path)
    first, last = np.mean(module.losses[:3]), np.mean(module.losses[-3:])
    learning_record["train loss last/first (< 0.2)"] = last / first
    learning_record["val mse / first train loss (< 0.2)"] = (
        float(trainer.callback_metrics["val/mse"]) / first
    )
    assert last < 0.2 * first, (first, last)
    assert float(trainer.callback_metrics["val/mse"]) < 0.2 * first  # validation ran too
    assert trainer.global_step == 30
    ckpt = torch.load(checkpoint_path(tmp_path), weights_only=False)
    assert ckpt["global_step"] == 30  # the end of training is always saved
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    # The per-step scheduler stepped 30 times.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * 0.97**30)


def test_gradient_clipping_uses_one_global_norm(tmp_path: Path) -> None:
    """With clip 1e-3 and lr 1, one SGD step moves the weights by at most 1e-3 in total L2."""
    cfg = quick_cfg(max_steps=1, gradient_clip_val=1e-3)
    seed_run(cfg)
    module = TinyRegression(lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    fit(module, loader(), cfg, tmp_path, logger=False)
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3)


# --------------------------------------------------------------------------------------------
# The sampler.


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    a = ResumableRandomSampler(N_SAMPLES, seed=5)
    b = ResumableRandomSampler(N_SAMPLES, seed=5)
    assert list(a) == list(b)
    assert sorted(a) == list(range(N_SAMPLES))  # a permutation
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(N_SAMPLES))
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ResumableRandomSampler(N_SAMPLES, seed=6)) != first
    # seed + epoch collisions are avoided: (5, 1) and (6, 0) give different orders.
    c = ResumableRandomSampler(N_SAMPLES, seed=6)
    assert list(c) != list(a)


@pytest.mark.parametrize("n", [10, 11, 3])
def test_sampler_shards_interleave_into_the_combined_batch(n: int) -> None:
    world, b = 2, 2
    single = ResumableRandomSampler(n, seed=1, num_replicas=1, rank=0)
    shards = [ResumableRandomSampler(n, seed=1, num_replicas=world, rank=r) for r in range(world)]
    per_rank = [list(s) for s in shards]
    assert len({len(p) for p in per_rank}) == 1 == len({len(s) for s in shards})
    assert len(shards[0]) == -(-n // world)
    padded = shards[0].epoch_order(0).tolist()
    full = list(single)
    assert padded[:n] == full and len(padded) == world * len(shards[0])
    for t in range(len(per_rank[0]) // b):
        combined = padded[t * b * world : (t + 1) * b * world]
        ranks = [x for p in per_rank for x in p[t * b : (t + 1) * b]]
        assert sorted(ranks) == sorted(combined)


def test_sampler_num_samples_replacement_and_drop_last() -> None:
    longer = list(ResumableRandomSampler(5, seed=0, num_samples=12))
    assert len(longer) == 12 and sorted(np.bincount(longer).tolist()) == [2, 2, 2, 3, 3]
    assert sorted(longer[:5]) == sorted(longer[5:10]) == list(range(5))  # whole permutations
    drawn = list(ResumableRandomSampler(5, seed=0, num_samples=50, replacement=True))
    assert len(drawn) == 50 and set(drawn) <= set(range(5)) and len(set(drawn)) == 5
    cut = ResumableRandomSampler(11, seed=0, num_replicas=2, rank=1, drop_last=True)
    assert len(cut) == len(list(cut)) == 5
    with pytest.raises(ConfigError, match="rank 2"):
        len(list(ResumableRandomSampler(4, seed=0, num_replicas=2, rank=2)))


def test_sampler_start_is_used_once_and_only_for_its_epoch() -> None:
    s = ResumableRandomSampler(N_SAMPLES, seed=2)
    full = list(s)
    s.set_start(12)
    assert len(s) == N_SAMPLES  # len stays the full epoch: Lightning counts batches from it
    assert list(s) == full[12:]
    assert list(s) == full  # one-shot
    s.set_start(12, epoch=0)
    s.set_epoch(1)
    assert len(list(s)) == N_SAMPLES  # the start was for epoch 0, not this one


# --------------------------------------------------------------------------------------------
# Kill and resume.


_UNINTERRUPTED: dict[tuple, tuple[dict[str, torch.Tensor], float, list[list[int]]]] = {}
TOTAL_STEPS = 25  # 10 batches per epoch: ends in the middle of an epoch


def resume_cfg(accumulate: int, by_epochs: bool, every: int = 0) -> TrainerConfig:
    length = dict(max_steps=-1, max_epochs=3) if by_epochs else dict(max_steps=TOTAL_STEPS)
    return quick_cfg(**length, accumulate_grad_batches=accumulate, checkpoint_every_n_steps=every)


def _uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, workers: int, accumulate: int, by_epochs: bool
) -> tuple[dict[str, torch.Tensor], float, list[list[int]]]:
    key = (workers, accumulate, by_epochs)
    if key not in _UNINTERRUPTED:
        cfg = resume_cfg(accumulate, by_epochs)
        seed_run(cfg)
        module = TinyRegression(noise=0.1)
        run = tmp_path_factory.mktemp("uninterrupted")
        trainer = fit(module, loader(num_workers=workers), cfg, run, logger=False)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        _UNINTERRUPTED[key] = (weights(module), lr, module.seen)
    return _UNINTERRUPTED[key]


@pytest.mark.parametrize(
    ("kill_at", "every", "workers", "accumulate", "by_epochs", "saved_at"),
    [
        (17, 3, 0, 1, False, 15),  # mid-epoch 1: 5 of its 10 batches consumed
        (13, 10, 0, 1, False, 10),  # step trigger on the last batch of epoch 0
        (13, 0, 0, 1, False, 10),  # end-of-epoch trigger only
        (13, 0, 0, 1, True, 10),  # the same with max_epochs instead of max_steps
        (17, 3, 1, 1, False, 15),  # mid-epoch with a worker process that prefetches indices
        (14, 4, 0, 2, False, 12),  # 2 batches per step: saved after 24 batches, 4 into epoch 2
    ],
    ids=["mid-epoch", "last-batch", "epoch-end", "epoch-end-max-epochs", "worker", "accumulate"],
)
def test_killed_run_resumes_exactly(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    kill_at: int,
    every: int,
    workers: int,
    accumulate: int,
    by_epochs: bool,
    saved_at: int,
) -> None:
    ref_weights, ref_lr, ref_seen = _uninterrupted(tmp_path_factory, workers, accumulate, by_epochs)

    cfg = resume_cfg(accumulate, by_epochs, every)
    seed_run(cfg)
    first = TinyRegression(noise=0.1)
    with pytest.raises(_Killed):
        fit(first, loader(num_workers=workers), cfg, tmp_path, callbacks=[KillAt(kill_at)])
    assert first.seen == ref_seen[: kill_at * accumulate]
    assert torch.load(checkpoint_path(tmp_path), weights_only=False)["global_step"] == saved_at

    # A new process would rebuild everything: fresh module (other init), fresh loader.
    torch.manual_seed(999)
    second = TinyRegression(noise=0.1)
    trainer = fit(second, loader(num_workers=workers), cfg, tmp_path, resume="auto")
    assert trainer.global_step == len(ref_seen) // accumulate
    # Same batches in the same order, none replayed, none skipped.
    assert second.seen == ref_seen[saved_at * accumulate :]
    final = weights(second)
    for name, ref in ref_weights.items():
        assert torch.equal(final[name], ref), name
    assert trainer.optimizers[0].param_groups[0]["lr"] == ref_lr


def test_plain_sampler_mid_epoch_resume_replays_the_epoch_start(tmp_path: Path) -> None:
    """What Lightning does without the resumable sampler, and the warning that says so."""
    ds = regression_data()

    def plain() -> DataLoader:
        return DataLoader(ds, batch_size=4, shuffle=False)

    cfg = quick_cfg(max_steps=20, checkpoint_every_n_steps=3)
    with pytest.raises(_Killed):
        fit(TinyRegression(), plain(), cfg, tmp_path, callbacks=[KillAt(14)], logger=False)
    module = TinyRegression()
    with pytest.warns(UserWarning, match="no ResumableRandomSampler"):
        fit(module, plain(), cfg, tmp_path, logger=False)
    # Saved at step 12 = epoch 1 after 2 batches; the resumed epoch starts again at sample 0
    # and stops after the 8 batches Lightning still expects, so samples 32..39 are never seen.
    assert module.seen[0] == [0, 1, 2, 3]
    assert [i for b in module.seen[:8] for i in b] == list(range(32))


def test_resume_never_and_missing_path(tmp_path: Path) -> None:
    cfg = quick_cfg(max_steps=3)
    fit(TinyRegression(), loader(), cfg, tmp_path, logger=False)
    again = TinyRegression()
    fit(again, loader(), cfg, tmp_path, resume="never", logger=False)
    assert len(again.seen) == 3  # started over instead of finding the run finished
    with pytest.raises(MissingFileError, match="checkpoint to resume from"):
        fit(TinyRegression(), loader(), cfg, tmp_path, resume=tmp_path / "nope.ckpt")


# --------------------------------------------------------------------------------------------
# Atomic checkpoints.


def _partial_then_fail(obj: object, f: BinaryIO, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(28, "No space left on device")


def test_checkpoint_io_crash_mid_save_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _partial_then_fail)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left


def test_training_crash_mid_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = quick_cfg(max_steps=4)
    fit(TinyRegression(), loader(), cfg, tmp_path, logger=False)
    last = checkpoint_path(tmp_path)
    before = last.read_bytes()

    longer = quick_cfg(max_steps=8, checkpoint_every_n_steps=2)
    monkeypatch.setattr(torch, "save", _partial_then_fail)
    with pytest.raises(OSError, match="No space"):
        fit(TinyRegression(), loader(), longer, tmp_path, logger=False)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]

    module = TinyRegression()
    trainer = fit(module, loader(), longer, tmp_path, logger=False)
    assert len(module.seen) == 4 and trainer.global_step == 8  # resumed from step 4


# --------------------------------------------------------------------------------------------
# The NaN guard.


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("term", r"^step 3: loss term 'l1' is nan \(epoch 0, batch 3\)$"),
        ("logged", r"^step 2: logged value 'train/mse' is inf"),
        ("loss", r"^step 1: loss is nan"),
    ],
)
def test_non_finite_guard_names_step_and_term(tmp_path: Path, where: str, message: str) -> None:
    step = int(message[6])
    cfg = quick_cfg(max_steps=6, checkpoint_every_n_steps=1)
    with pytest.raises(NonFiniteLossError, match=message) as info:
        fit(TinyRegression(bad_at=(step, where)), loader(), cfg, tmp_path, logger=False)
    assert info.value.step == step
    # The failing step never reached the checkpoint: the guard runs before the save.
    assert torch.load(checkpoint_path(tmp_path), weights_only=False)["global_step"] == step


# --------------------------------------------------------------------------------------------
# DDP on CPU: two processes with batch b == one process with batch 2b.

_DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_training import ddp_main
ddp_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


def ddp_cfg(devices: int) -> TrainerConfig:
    return quick_cfg(
        devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=8, seed=11
    )


def ddp_main(run_dir: str, devices: int, batch_size: int) -> None:
    """One run of the comparison; under strategy=ddp Lightning re-runs this script per rank."""
    torch.set_num_threads(1)
    cfg = ddp_cfg(devices)
    seed_run(cfg)
    module = TinyRegression(lr=0.1)
    trainer = fit(module, loader(batch_size=batch_size, seed=4), cfg, run_dir, logger=False)
    export_weights(Path(run_dir) / "model.safetensors", module.state_dict(), {"steps": 8})
    write_metrics(run_dir, {"world_size": trainer.world_size, "rank": trainer.global_rank})


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_combined_batch(tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(TESTS_DIR)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, str(script), str(ddp_dir), "2", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Both ranks ran ddp_main; only rank 0 wrote.
    assert json.loads((ddp_dir / "metrics.json").read_text()) == {"world_size": 2, "rank": 0}

    ddp_main(str(tmp_path / "single"), 1, 8)
    single = load_file(tmp_path / "single" / "model.safetensors")
    ddp = load_file(ddp_dir / "model.safetensors")
    assert single.keys() == ddp.keys()
    seed_run(ddp_cfg(1))
    start = TinyRegression(lr=0.1)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=1e-6)
        assert not torch.equal(single[name], start.state_dict()[name])  # it did train
    ckpt = torch.load(checkpoint_path(ddp_dir), weights_only=False)
    assert ckpt["global_step"] == 8


# --------------------------------------------------------------------------------------------
# Run outputs.


def test_export_weights_handles_tied_tensors_and_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = torch.arange(6.0).reshape(2, 3)
    tensors = {"encoder.w": shared, "head.w": shared, "encoder.row": shared[1]}
    path = export_weights(tmp_path / "model.safetensors", tensors, {"stage": "masked", "step": 8})
    loaded = load_file(path)
    assert torch.equal(loaded["encoder.w"], shared) and torch.equal(loaded["head.w"], shared)
    assert torch.equal(loaded["encoder.row"], shared[1])
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["stage"] == "masked" and json.loads(meta["step"]) == 8 and meta["format"] == "pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    monkeypatch.setattr(training, "_global_rank", lambda: 1)
    export_weights(tmp_path / "other.safetensors", tensors)
    assert not (tmp_path / "other.safetensors").exists()  # only rank 0 writes


def test_write_metrics_merges_atomically(tmp_path: Path) -> None:
    write_metrics(tmp_path, {"stage": "ft", "nyu": {"abs_rel": torch.tensor(0.12)}})
    merged = write_metrics(
        tmp_path, {"nyu": {"delta1": np.float32(0.5)}, "steps": np.int64(7), "bad": float("nan")}
    )
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == merged
    assert on_disk == {
        "stage": "ft",
        "nyu": {"abs_rel": pytest.approx(0.12), "delta1": 0.5},
        "steps": 7,
        "bad": None,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="metrics.json: expected a JSON object"):
        write_metrics(tmp_path, {"x": 1})


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    seed_run(quick_cfg(seed=5, deterministic=False))
    torch.save(training._capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    training._restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert again[0] == expected[0] and again[1] == expected[1]
    assert torch.equal(again[2], expected[2])


def test_fit_takes_a_datamodule_or_a_mapping(tmp_path: Path) -> None:
    class Data(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return loader()

    cfg = quick_cfg(max_steps=3)
    module = TinyRegression()
    assert fit(module, Data(), cfg, tmp_path / "a", logger=False).global_step == 3
    val = DataLoader(regression_data(), batch_size=8)
    every_2 = quick_cfg(max_steps=3, val_check_interval=2)  # batches, not a fraction
    trainer = fit(TinyRegression(), {"train": loader(), "val": val}, every_2, tmp_path / "b")
    assert "val/mse" in trainer.callback_metrics
    with pytest.raises(ConfigError, match="'train' and 'val'"):
        fit(TinyRegression(), {"training": loader()}, cfg, tmp_path / "c", logger=False)


def test_seed_run_is_reproducible() -> None:
    cfg = quick_cfg(seed=21, deterministic=False)
    seed_run(cfg)
    a = (torch.rand(3), np.random.rand(), TinyRegression().net.weight.clone())  # noqa: NPY002
    seed_run(cfg)
    b = (torch.rand(3), np.random.rand(), TinyRegression().net.weight.clone())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
