"""Shared fixtures: one tiny synthetic world per test session, read-only for every test."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesadepth.config import load_config
from mesadepth.data import lsun
from mesadepth.data.world import PRESETS, SynthConfig, generate_world


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
