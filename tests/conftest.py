"""Shared fixtures: one tiny synthetic world per test session, read-only for every test; the
seed, thread count and value record of the learning checks (``@pytest.mark.learning``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mesadepth.config import load_config
from mesadepth.data import lsun
from mesadepth.data.world import PRESETS, SynthConfig, generate_world

# A learning check (a loss falls, a depth error drops, one variant beats another) must hold for
# seeds 0-2 and torch threads 1 and 2. These variables re-run the suite's checks that way without
# editing a test (``tests/learning_spread.py`` loops over them); unset, every test keeps its own.
SEED_ENV = "MESADEPTH_TEST_SEED"  # replaces each learning check's seed(s)
THREADS_ENV = "MESADEPTH_TEST_THREADS"  # torch.set_num_threads for every test
RECORD_ENV = "MESADEPTH_TEST_RECORD"  # a .jsonl file the learning checks append their values to


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r}: expected an integer") from None
    smallest = 1 if name == THREADS_ENV else 0
    if value < smallest:
        kind = "a positive" if smallest else "a non-negative"
        raise pytest.UsageError(f"{name}={raw!r}: expected {kind} integer")
    return value


def pytest_configure(config: pytest.Config) -> None:
    # A mistyped variable stops the session with one clear line, before any test runs.
    _env_int(SEED_ENV)
    _env_int(THREADS_ENV)


def threads_for_tests(default: int | None = None) -> int | None:
    """The torch thread count a test should run with: ``MESADEPTH_TEST_THREADS`` if set, else
    ``default`` (``None``: torch's own default, which follows ``OMP_NUM_THREADS``)."""
    env = _env_int(THREADS_ENV)
    return default if env is None else env


def tiny_world_config(*overrides: str) -> SynthConfig:
    """The ``tiny`` preset (64x48) with ``key=value`` overrides."""
    return load_config(
        SynthConfig, None, list(overrides), base={"preset": "tiny", **PRESETS["tiny"]}
    )


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete ``tiny`` world (video, video_aux, nyu, lsun, ibims); tests must not modify it.

    Tests that write into a world (e.g. pseudo-depth) copy the part they need to ``tmp_path``.
    """
    out = tmp_path_factory.mktemp("tiny_world")
    generate_world(tiny_world_config("checks=false"), out, progress=False)
    lsun.close_lmdb_envs()
    return out


# ----------------------------------------------------------------------------- learning checks


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Applies ``MESADEPTH_TEST_THREADS`` to every test (modules that pin their own count ask
    :func:`threads_for_tests` too, so the variable wins there as well)."""
    n = threads_for_tests()
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def learning_seed(request: pytest.FixtureRequest) -> int:
    """The seed of a learning check: ``MESADEPTH_TEST_SEED`` if set, else the ``seed`` of its
    ``@pytest.mark.learning(seed=...)`` marker (the value the suite runs by default)."""
    seed = _seed_of(request.node)
    if seed is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: learning_seed needs @pytest.mark.learning(seed=<default>)"
        )
    return seed


def _seed_of(node: pytest.Item) -> int | None:
    marker = node.get_closest_marker("learning")
    if marker is None or "seed" not in marker.kwargs:
        return None  # not seeded: a check without a random source
    env = _env_int(SEED_ENV)
    return int(marker.kwargs["seed"]) if env is None else env


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


_OUTCOME = pytest.StashKey[str]()


@pytest.fixture
def learning_record(request: pytest.FixtureRequest) -> Iterator[dict]:
    """A dict a learning check fills with the quantities it asserts on (before asserting); with
    ``MESADEPTH_TEST_RECORD`` set, they are appended to that .jsonl file with the seed, the
    thread count and the outcome."""
    values: dict = {}
    threads = torch.get_num_threads()  # after every autouse fixture has set it
    yield values
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    line = {
        "test": request.node.nodeid,
        "env_seed": _env_int(SEED_ENV),
        "seed": _seed_of(request.node),  # None: the check has no random source
        "threads": threads,
        "outcome": request.node.stash.get(_OUTCOME, "error"),
        "values": values,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def tiny_depth_anything_model(image_size: int):
    """A seeded, randomly initialised Depth Anything small enough for CPU tests (transformers
    is a dev dependency; the test is skipped without it)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    backbone = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    cfg = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    return transformers.DepthAnythingForDepthEstimation(cfg)


def tiny_video_recipe(root: Path, run: Path, version: str = "v2", *overrides: str):
    """A tiny recipe: 64x64 training size, narrow pose nets and decoder, no sanity check."""
    from mesadepth.stages.video import VideoRecipe

    return load_config(
        VideoRecipe,
        None,
        [
            f"run_dir={run}",
            f"version={version}",
            "encoder.preset=tiny-cpu",
            "encoder.drop_path_rate=0.0",
            "decoder.num_ch_dec=[8,16,16,32,32]",
            "pose.width=8",
            f"data.root={root}",
            "data.size=[64,64]",
            "data.batch_size=4",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.progress_bar=false",
            "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1",
            "figures=1",
            *overrides,
        ],
    )
