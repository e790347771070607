"""The command line: synth with presets and overrides, the saved config, inspect, clear errors."""

from __future__ import annotations

import pytest
import yaml

from mesadepth.cli import build_parser, main
from mesadepth.data.lsun import close_lmdb_envs

SMALL = [
    "--preset",
    "tiny",
    "--quiet",
    "lsun.per_category=2",
    "ibims.images=2",
    "aux.scenes=0",
    "checks=false",
]


def test_synth_writes_the_resolved_config_and_inspect_reads_every_format(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["synth", "--out", str(out), "--seed", "4", "video.frames=5", *SMALL]) == 0
    close_lmdb_envs()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["seed"] == 4 and cfg["video"]["frames"] == 5 and cfg["preset"] == "tiny"
    assert cfg["image"] == {"width": 64, "height": 48, "supersample": 2}
    assert "mesadepth synth" in (out / "config.yaml").read_text().splitlines()[0]
    printed = capsys.readouterr().out
    for row in (
        "video train",
        "video val",
        "video test",
        "nyu sync train",
        "nyu official test",
        "nyu labeled test",
        "lsun",
        "lsun images",
        "ibims",
    ):
        assert f"\n{row} " in printed, row
    assert "ERROR" not in printed
    # inspect on its own gives the same table
    assert main(["inspect", str(out)]) == 0
    close_lmdb_envs()
    again = capsys.readouterr().out
    assert again.strip() == printed.split("\n\n", 1)[1].strip()


def test_unknown_key_names_the_closest_valid_one(tmp_path, capsys):
    code = main(["synth", "--out", str(tmp_path / "x"), "--preset", "tiny", "video.frame=5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "video.frame" in err and "video.frames" in err
    assert not (tmp_path / "x").exists()


def test_a_non_empty_output_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["synth", "--out", str(tmp_path), "--preset", "tiny", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_help_teaches_every_key(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--help"])
    text = capsys.readouterr().out
    for key in (
        "video.frames",
        "nyu.sync_step",
        "lsun.categories",
        "ibims.images",
        "image.width",
        "seed",
    ):
        assert key in text, key
    assert "tiny" in text and "demo" in text


def test_inspect_without_anything_to_read_is_an_error(capsys):
    assert main(["inspect"]) == 2
    assert "give a world folder" in capsys.readouterr().err
