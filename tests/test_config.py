"""Recipes: YAML + dotted overrides -> typed dataclasses, with errors that teach."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mesadepth.config import (
    describe,
    dotted_keys,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from mesadepth.errors import ConfigError, MissingFileError


@dataclass
class Optim:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "step"] = "cosine"


@dataclass
class Recipe:
    name: str = "run"
    epochs: int = 10
    amp: bool = False
    init: str | None = None
    layers: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    optim: Optim = field(default_factory=Optim)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(
        Recipe,
        None,
        ["epochs=3", "optim.lr=1e-4", "layers=[1, 2]", "init=a/b.safetensors", "amp=true"],
    )
    assert cfg == Recipe(
        epochs=3, amp=True, init="a/b.safetensors", layers=[1, 2], optim=Optim(lr=1e-4)
    )
    assert (
        isinstance(cfg.optim.lr, float) and cfg.optim.lr == 0.0001
    )  # YAML 1.1 reads 1e-4 as a string
    save_config(cfg, tmp_path / "config.yaml", command="mesadepth x epochs=3")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# mesadepth") and "epochs=3" in text.splitlines()[0]
    assert load_config(Recipe, tmp_path / "config.yaml") == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]


def test_null_override_and_whole_section():
    cfg = load_config(Recipe, None, ["init=null", "optim={lr: 0.5, schedule: step}"])
    assert cfg.init is None and cfg.optim == Optim(lr=0.5, schedule="step")


@pytest.mark.parametrize(
    "item,closest",
    [
        ("epoch=3", "epochs"),
        ("optim.lr_rate=1", "optim.lr"),
        ("optm.lr=1", "optim.lr"),
        ("optim.schedul=step", "optim.schedule"),
    ],
)
def test_unknown_keys_suggest_the_closest(item, closest):
    with pytest.raises(ConfigError, match=f"did you mean '{closest}'"):
        load_config(Recipe, None, [item])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("epochs: 2\noptim:\n  lr: 0.1\n  warmup: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Recipe, p)
    assert str(p) in str(exc.value) and "optim.warmup" in str(exc.value)


def test_type_errors_name_key_and_expectation():
    with pytest.raises(ConfigError, match="'amp': expected true or false, got 'maybe'"):
        load_config(Recipe, None, ["amp=maybe"])
    with pytest.raises(
        ConfigError, match=r"'optim.schedule': expected one of \['cosine', 'step'\]"
    ):
        load_config(Recipe, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="'epochs': expected an integer"):
        load_config(Recipe, None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match="'optim.betas': expected 2 items"):
        from_dict(Recipe, {"optim": {"betas": [0.9]}})
    with pytest.raises(ConfigError, match="'epochs' is a value, not a section"):
        load_config(Recipe, None, ["epochs.x=1"])


@pytest.mark.parametrize("item", ["epochs", "=3", "optim..lr=1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides([item])


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 5\noptim:\n  lr: 0.01\n  schedule: step\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim:\n  lr: 0.02\n")
    cfg = load_config(Recipe, tmp_path / "child.yaml", ["epochs=7"])
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.schedule) == (7, 0.02, "step")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Recipe, tmp_path / "a.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(MissingFileError, match="nope.yaml"):
        load_config(Recipe, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\noptim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+"):
        load_config(Recipe, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Recipe, top)


def test_describe_lists_every_key_with_default_and_help():
    text = describe(Recipe)
    for key in dotted_keys(Recipe):
        if key != "optim":
            assert key in text, key
    assert "optim.lr = 0.001  [float]  peak learning rate" in text
    assert "layers = [2, 2, 6, 2]" in text
