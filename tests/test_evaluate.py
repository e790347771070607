"""`mesadepth evaluate --predictions`: saved depth maps scored under the NYUv2 and IBims-1 protocols."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mesadepth.cli import main
from mesadepth.config import load_config
from mesadepth.data.ibims import IBimsDataset
from mesadepth.data.nyu import NYULabeledDataset
from mesadepth.data.world import PRESETS, SynthConfig, generate_world
from mesadepth.io import write_png


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    cfg = load_config(
        SynthConfig,
        None,
        [
            "video.train_scenes=1",
            "video.val_scenes=0",
            "aux.scenes=0",
            "lsun.per_category=0",
            "checks=false",
        ],
        base={"preset": "tiny", **PRESETS["tiny"]},
    )
    generate_world(cfg, out, progress=False)
    return out


def test_nyu_scores_scaled_ground_truth_exactly(world: Path, tmp_path: Path, capsys):
    ds = NYULabeledDataset(
        world / "nyu" / "nyu_depth_v2_labeled.mat", world / "nyu" / "splits.mat", split="test"
    )
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(len(ds)):
        s = ds[i]
        gt = np.floor(s["depth"] * 1000) / 1000  # what the protocol scores against (mm)
        pred = np.where(gt > 0, gt * 1.1, 2.0).astype(np.float32)
        if i % 2:  # both naming schemes and both file types are accepted
            np.save(preds / f"{i:05d}.npy", pred)
        else:
            write_png(preds / f"{s['name']}.png", np.round(pred * 1000).astype(np.uint16))
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "nyu",
                "--data",
                str(world / "nyu"),
                "--predictions",
                str(preds),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n_images"] == len(ds) and len(res["per_image"]) == len(ds)
    # pred = 1.1 gt: AbsRel 0.1 and log10 = log10(1.1) on every pixel (PNG rounding aside), d1 = 1.
    assert res["mean"]["abs_rel"] == pytest.approx(0.1, abs=2e-3)
    assert res["mean"]["log10"] == pytest.approx(np.log10(1.1), abs=1e-3)
    assert res["mean"]["d1"] == 1.0
    printed = capsys.readouterr().out
    assert "RMSE" in printed and "AbsRel" in printed


def test_ibims_ground_truth_as_prediction(world: Path, tmp_path: Path):
    ds = IBimsDataset(world / "ibims")
    preds = tmp_path / "p"
    preds.mkdir()
    for i in range(len(ds)):
        s = ds[i]
        np.save(
            preds / f"{s['name']}.npy",
            np.where(s["depth"] > 0, s["depth"], np.nan).astype(np.float32),
        )
    out = tmp_path / "m.json"
    args = [
        "evaluate",
        "--dataset",
        "ibims",
        "--data",
        str(world / "ibims"),
        "--predictions",
        str(preds),
        "--out",
        str(out),
        "--quiet",
    ]
    assert main([*args, "--ibims-scaled-planes"]) == 0
    m = json.loads(out.read_text())["mean"]
    assert m["rel"] == 0 and m["thr1"] == 1
    assert m["pe_ori"] == pytest.approx(0, abs=1e-3) and m["pe_fla"] == pytest.approx(0, abs=1e-3)
    assert 0 < m["dbe_acc"] < 3  # Canny on the truth is close to, not on, the GT edges (spec 5.8)
    # With the official 640x480 plane threshold no plane of a 64x48 image is large enough.
    assert main(args) == 0
    assert json.loads(out.read_text())["mean"]["pe_fla"] is None


def test_missing_prediction_names_the_file(world: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "evaluate",
            "--dataset",
            "nyu",
            "--data",
            str(world / "nyu"),
            "--predictions",
            str(tmp_path / "empty"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "prediction for test image 0" in err and str(tmp_path / "empty") in err
