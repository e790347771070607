"""Recipes: YAML + dotted overrides -> typed dataclasses, with errors that teach."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from mesadepth import __version__
from mesadepth.config import (
    apply_overrides,
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
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    schedule: Literal["cosine", "step"] = field(default="cosine", metadata={"help": "LR decay"})
    warmup_steps: int = 0


@dataclass
class Teacher:
    name: str = "leres"
    scale: float = 1.0


@dataclass
class Recipe:
    name: str = field(default="run", metadata={"help": "the run's name"})
    epochs: int = 10
    amp: bool = False
    init: str | None = field(default=None, metadata={"help": "weights to start from"})
    seed: Optional[int] = 0  # noqa: UP045 - the typing.Optional spelling must work too
    data: Path = Path("data/nyu")
    layers: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    weights: dict[str, float] = field(default_factory=lambda: {"photo": 1.0, "smooth": 0.1})
    optim: Optim = field(default_factory=Optim, metadata={"help": "optimiser"})
    teacher: Teacher | None = None


@dataclass
class Outer:
    # A section whose default differs from its class's defaults.
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, warmup_steps=100))


@dataclass
class Needs:
    out: str
    epochs: int = 1


def test_nested_round_trip_dict_dataclass_yaml(tmp_path):
    data = {
        "name": "mp",
        "epochs": 3,
        "amp": True,
        "init": "runs/mp/model.safetensors",
        "seed": None,
        "data": "/data/lsun",
        "layers": [1, 2],
        "weights": {"photo": 0.85},
        "optim": {"lr": 0.0001, "betas": [0.8, 0.9], "schedule": "step", "warmup_steps": 5},
        "teacher": {"name": "own", "scale": 2.0},
    }
    cfg = from_dict(Recipe, data)
    assert cfg.optim == Optim(lr=1e-4, betas=(0.8, 0.9), schedule="step", warmup_steps=5)
    assert cfg.teacher == Teacher("own", 2.0)
    assert cfg.data == Path("/data/lsun") and isinstance(cfg.optim.betas, tuple)
    plain = to_dict(cfg)
    assert plain == data  # tuples -> lists, paths -> strings, field order kept
    assert list(plain) == [
        "name",
        "epochs",
        "amp",
        "init",
        "seed",
        "data",
        "layers",
        "weights",
        "optim",
        "teacher",
    ]
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out, command=["mesadepth", "pretrain", "masked", "name=my run"])
    lines = out.read_text().splitlines()
    assert (
        lines[0] == f"# mesadepth {__version__} | command: mesadepth pretrain masked 'name=my run'"
    )
    assert lines[1] == "name: mp"  # dataclass field order, not sorted
    assert load_config(Recipe, out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
    assert from_dict(Recipe, {}) == Recipe()  # every key optional
    assert load_config(Recipe, None) == Recipe()


def test_overrides_take_the_field_types():
    cfg = load_config(
        Recipe,
        None,
        [
            "epochs=3",
            "optim.lr=1e-4",
            "teacher.scale=2",
            "amp=true",
            "layers=[1, 2]",
            "optim.betas=[0.5, 1]",
            "seed=null",
            "init=a/b.safetensors",
            "name=2024",
            "weights.photo=2",
        ],
    )
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    # YAML 1.1 reads 1e-4 (no dot) as a string; the float field reads it as the number.
    assert cfg.optim.lr == 0.0001 and type(cfg.optim.lr) is float
    assert cfg.teacher == Teacher(scale=2.0) and type(cfg.teacher.scale) is float
    assert cfg.amp is True
    assert cfg.layers == [1, 2]
    assert cfg.optim.betas == (0.5, 1.0) and all(type(b) is float for b in cfg.optim.betas)
    assert cfg.seed is None
    assert cfg.init == "a/b.safetensors"
    assert cfg.name == "2024"
    # One dict entry set: the other default entries stay.
    assert cfg.weights == {"photo": 2.0, "smooth": 0.1}


def test_section_override_merges_and_section_defaults_are_kept(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.02\n  schedule: step\n")
    cfg = load_config(Recipe, recipe, ["optim={warmup_steps: 7, betas: [0.1, 0.2]}"])
    assert cfg.optim == Optim(lr=0.02, betas=(0.1, 0.2), schedule="step", warmup_steps=7)
    # A partial section fills from the field's default instance, not the class defaults.
    assert load_config(Outer, None, ["optim.schedule=step"]).optim == Optim(
        lr=0.5, schedule="step", warmup_steps=100
    )
    assert load_config(Recipe, None, ["teacher=null"]).teacher is None


def test_base_mapping_is_layered_under_and_never_modified():
    preset = {"epochs": 2, "optim": {"lr": 0.3}, "weights": {"photo": 1.0}}
    before = copy.deepcopy(preset)
    cfg = load_config(Recipe, None, ["optim.schedule=step", "weights.x=3"], base=preset)
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.schedule) == (2, 0.3, "step")
    assert cfg.weights == {"photo": 1.0, "x": 3.0}
    assert preset == before
    data = {"optim": {"lr": 0.3}}
    inner = data["optim"]
    assert apply_overrides(data, [("optim.lr", 0.4)], Recipe) is data
    assert data == {"optim": {"lr": 0.4}} and inner == {"lr": 0.3}


def test_type_errors_name_key_type_and_value():
    with pytest.raises(ConfigError, match=r"'amp': expected bool \(true or false\), got 'maybe'"):
        load_config(Recipe, None, ["amp=maybe"])
    with pytest.raises(
        ConfigError, match=r"'optim.schedule': expected one of \['cosine', 'step'\], got 'linear'"
    ):
        load_config(Recipe, None, ["optim.schedule=linear"])
    with pytest.raises(
        ConfigError, match=r"override 'epochs=2.5': 'epochs': expected int, got 2.5"
    ):
        load_config(Recipe, None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match=r"'amp': expected bool .*got 1"):
        from_dict(Recipe, {"amp": 1})  # bool is strict: 1 is not true
    with pytest.raises(
        ConfigError, match=r"'optim.betas': expected tuple\[float, float\] \(2 items\)"
    ):
        from_dict(Recipe, {"optim": {"betas": [0.9]}})
    with pytest.raises(ConfigError, match=r"'layers\[1\]': expected int, got 'x'"):
        from_dict(Recipe, {"layers": [1, "x"]})
    with pytest.raises(ConfigError, match=r"'layers': expected list\[int\], got 'abc'"):
        from_dict(Recipe, {"layers": "abc"})
    with pytest.raises(ConfigError, match=r"'init': expected str or null, got \[1\]"):
        from_dict(Recipe, {"init": [1]})
    with pytest.raises(ConfigError, match="'epochs' holds a value of type int, not a section"):
        load_config(Recipe, None, ["epochs.x=1"])
    with pytest.raises(ConfigError, match=r"missing required key\(s\): out"):
        from_dict(Needs, {"epochs": 2})
    assert from_dict(Needs, {"out": "x"}) == Needs("x")


@pytest.mark.parametrize(
    "item,closest",
    [
        ("epoch=3", "epochs"),
        ("optim.lr_rate=1", "optim.lr"),
        ("optm.lr=1", "optim.lr"),
        ("optim.schedul=step", "optim.schedule"),
        ("lr=1", "optim.lr"),  # the section forgotten
        ("teacher.scal=2", "teacher.scale"),  # inside an optional section
    ],
)
def test_unknown_keys_suggest_the_closest(item, closest):
    with pytest.raises(ConfigError) as exc:
        load_config(Recipe, None, [item])
    key = item.split("=")[0]
    assert f"unknown key '{key}'; did you mean '{closest}'?" in str(exc.value)


def test_unknown_key_without_a_close_match_lists_the_section():
    with pytest.raises(ConfigError) as exc:
        from_dict(Recipe, {"optim": {"momentum": 0.9}})
    assert str(exc.value) == (
        "unknown key 'optim.momentum'; valid keys under 'optim': "
        "optim.lr, optim.betas, optim.schedule, optim.warmup_steps"
    )


def test_unknown_key_in_a_file_names_the_file_and_the_closest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("epochs: 2\noptim:\n  lr: 0.1\n  schedle: step\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Recipe, p)
    assert str(exc.value) == (f"{p}: unknown key 'optim.schedle'; did you mean 'optim.schedule'?")


def test_base_inheritance_overriding_and_cycles(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "epochs: 5\nlayers: [1, 1]\noptim:\n  lr: 0.01\n  schedule: step\n"
    )
    (tmp_path / "child.yaml").write_text(
        "_base_: shared/base.yaml\nlayers: [3]\noptim:\n  lr: 0.02\n"
    )
    cfg = load_config(Recipe, tmp_path / "child.yaml", ["epochs=7"])
    # child over base (deep-merged, lists replaced), then the override over both
    assert (cfg.epochs, cfg.layers, cfg.optim.lr, cfg.optim.schedule) == (7, [3], 0.02, "step")

    # A mistake in a base file is reported with the base file's name.
    (tmp_path / "shared" / "base.yaml").write_text("epocs: 5\n")
    with pytest.raises(
        ConfigError, match=r"base\.yaml: unknown key 'epocs'; did you mean 'epochs'"
    ):
        load_config(Recipe, tmp_path / "child.yaml")

    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: [a.yaml]\n")
    with pytest.raises(
        ConfigError, match=r"_base_ inheritance cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"
    ):
        load_config(Recipe, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: gone.yaml\n")
    with pytest.raises(MissingFileError, match="gone.yaml"):
        load_config(Recipe, tmp_path / "c.yaml")


@pytest.mark.parametrize("item", ["epochs", "=3", " =3", "optim..lr=1", ".lr=1"])
def test_malformed_override_names_the_item(item):
    with pytest.raises(ConfigError) as exc:
        parse_overrides([item])
    assert f"override {item!r}: expected key=value" in str(exc.value)


def test_parse_overrides_reads_values_as_yaml():
    assert parse_overrides(["a=3", "b.c=1.5", "d=true", "e=[1, x]", "f=null", "g=", "h=a=b"]) == [
        ("a", 3),
        ("b.c", 1.5),
        ("d", True),
        ("e", [1, "x"]),
        ("f", None),
        ("g", ""),
        ("h", "a=b"),
    ]
    with pytest.raises(ConfigError, match=r"override 'a=\[1': the value is not valid YAML"):
        parse_overrides(["a=[1"])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(MissingFileError, match="nope.yaml: missing recipe"):
        load_config(Recipe, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\noptim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 3, column 1: invalid YAML"):
        load_config(Recipe, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of keys .* got a list"):
        load_config(Recipe, top)
    twice = tmp_path / "twice.yaml"
    twice.write_text("epochs: 3\namp: true\nepochs: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"twice\.yaml: line 3, column 1: invalid YAML: key 'epochs' is given twice",
    ):
        load_config(Recipe, twice)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(Recipe, empty) == Recipe()


def test_file_values_get_the_same_coercion(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  lr: 5e-5\n  betas: [0, 1]\nname: 2024-01-01\n")
    cfg = load_config(Recipe, p)
    assert cfg.optim.lr == 5e-5 and cfg.optim.betas == (0.0, 1.0)
    assert cfg.name == "2024-01-01"  # YAML reads a date; a str field gets the text back
    # The float written back is a YAML float, so it loads as one without any repair.
    save_config(cfg, tmp_path / "out.yaml")
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["optim"]["lr"] == 5e-5


def test_dotted_keys_and_describe_list_every_key():
    keys = dotted_keys(Recipe)
    assert keys == [
        "name",
        "epochs",
        "amp",
        "init",
        "seed",
        "data",
        "layers",
        "weights",
        "optim",
        "optim.lr",
        "optim.betas",
        "optim.schedule",
        "optim.warmup_steps",
        "teacher",
        "teacher.name",
        "teacher.scale",
    ]
    lines = describe(Recipe).splitlines()
    assert len(lines) == len(keys)
    for key, line in zip(keys, lines, strict=True):
        assert line.strip().startswith(key), (key, line)
    assert "  name = run  [str]  the run's name" in lines
    assert "  init = null  [str | null]  weights to start from" in lines
    assert "  layers = [2, 2, 6, 2]  [list[int]]" in lines
    assert "  weights = {photo: 1.0, smooth: 0.1}  [dict[str, float]]" in lines
    assert "  optim.*  [section Optim]  optimiser" in lines
    assert "    optim.lr = 0.001  [float]  peak learning rate" in lines
    assert "    optim.betas = [0.9, 0.999]  [tuple[float, float]]  Adam betas" in lines
    assert "    optim.schedule = cosine  [cosine|step]  LR decay" in lines
    assert "    optim.warmup_steps = 0  [int]" in lines
    assert lines[13].startswith("  teacher.*  [section Teacher, or null] (null by default")
    assert "    teacher.scale = 1.0  [float]" in lines
    assert "out = (required)  [str]" in describe(Needs)
