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


def test_ibims_distance_errors_and_dbe_input_reach_json_and_table(world: Path, tmp_path, capsys):
    from mesadepth.data.ibims import write_ibims_mat, write_imagelist
    from mesadepth.evaluation.ibims import ibims_image_metrics

    # The world's IBims images with invalid GT on every third column of the top half, so that
    # masking the prediction (BS-Net's DBE input) changes the boundary errors.
    src = IBimsDataset(world / "ibims")
    data, preds = tmp_path / "ibims", tmp_path / "p"
    preds.mkdir()
    for i in range(len(src)):
        s = src[i]
        s["mask_invalid"][: s["depth"].shape[0] // 2, ::3] = 0
        fields = {k: s[k] for k in ("depth", "edges", "calib", "mask_invalid", "mask_transp")}
        for cls in ("wall", "table", "floor"):
            fields[f"mask_{cls}"] = s[f"mask_{cls}"]
            fields[f"mask_{cls}_paras"] = s["planes"][cls]
        write_ibims_mat(data / "ibims1_core_mat" / f"{s['name']}.mat", rgb=s["image"], **fields)
        # 1.25 x the truth: AbsRel 0.25 in every bin that holds pixels (exact in float32).
        pred = np.where(s["depth"] > 0, s["depth"] * np.float32(1.25), np.nan)
        np.save(preds / f"{s['name']}.npy", pred.astype(np.float32))
    write_imagelist(data / "imagelist.txt", [src[i]["name"] for i in range(len(src))])
    scored = IBimsDataset(data)
    items = [scored[i] for i in range(len(scored))]

    out = tmp_path / "m.json"
    args = ["evaluate", "--dataset", "ibims", "--data", str(data), "--predictions", str(preds)]
    args += ["--out", str(out), "--quiet", "--ibims-scaled-planes"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["protocol"] == {"dbe_input": "official", "scaled_planes": True}
    dist = res["distance"]
    assert dist["bin_edges"] == list(range(21))
    filled = [i for i, n in enumerate(dist["n_images"]) if n]
    assert filled and all(dist["rel"][i] == pytest.approx(0.25, abs=1e-6) for i in filled)
    assert all(dist["rel"][i] is None for i in range(20) if i not in filled)  # NaN -> null
    assert len(res["per_image"][0]["distance"]["rms"]) == 20
    printed = capsys.readouterr().out
    assert "distance-related errors" in printed and "masked prediction" not in printed
    row = next(ln for ln in printed.splitlines() if ln.strip().startswith(f"{filled[0]}-"))
    assert "0.250" in row
    official = res["per_image"]

    # The masked variant: recorded, noted under the table, and each image's DBE equals the
    # metric function's with dbe_input="masked"; the other metrics do not move.
    assert main([*args, "--ibims-dbe-input", "masked"]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["dbe_input"] == "masked"
    assert "masked prediction" in capsys.readouterr().out
    changed = 0
    for s, row, off in zip(items, res["per_image"], official, strict=True):
        pred = np.load(preds / f"{s['name']}.npy")
        want = ibims_image_metrics(s, pred, min_plane_fraction_of_image=True, dbe_input="masked")
        assert row["dbe_acc"] == pytest.approx(want["dbe_acc"], abs=1e-12)
        assert row["dbe_com"] == pytest.approx(want["dbe_com"], abs=1e-12)
        assert row["rel"] == off["rel"] and row["distance"] == off["distance"]
        changed += row["dbe_com"] != off["dbe_com"]
    assert changed > 0
    # The option belongs to the IBims protocol only.
    nyu = ["evaluate", "--dataset", "nyu", "--data", str(world / "nyu"), "--quiet"]
    assert main([*nyu, "--predictions", str(preds), "--ibims-dbe-input", "masked"]) == 2
    assert "--ibims-dbe-input applies to --dataset ibims" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------- --checkpoint


def _tiny_depth_model(seed: int = 0):
    import torch

    from mesadepth.models.backbone import build_encoder
    from mesadepth.models.depth_head import DepthModel

    torch.manual_seed(seed)
    model = DepthModel.from_encoder(build_encoder("tiny-cpu"), num_filters=(8, 8, 8)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoder."):
                p.normal_(0, 0.05)  # away from the near-constant initial output
            elif name.endswith(("norm1.weight", "norm2.weight")):
                # timm zero-initialises the res-post-norms: blocks would add nothing, and a
                # mis-mapped block key could not change the output.
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    from mesadepth.models.depth_head import save_depth_model

    model = _tiny_depth_model()
    path = save_depth_model(model, tmp_path_factory.mktemp("model") / "model.safetensors")
    return model, path


def _official_layout(model) -> dict:
    """A DepthModel state dict rewritten to MIM-Depth-Estimation's key names (spec 3.2, 2.2)."""
    import re

    out = {}
    for key, value in model.state_dict().items():
        if key == "encoder.mask_token":
            continue  # the depth repo's encoder has none
        if key.startswith("encoder."):
            k = key[len("encoder.") :]
            # timm puts patch merging at the start of stage i+1, the reference at the end of i.
            k = re.sub(
                r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k
            )
            k = k.replace("cpb_mlp", "rpe_mlp")
            k = "norm3." + k[len("norm.") :] if k.startswith("norm.") else k
            out["encoder." + k] = value
        elif key.startswith("decoder.last_layer_depth."):
            out[key[len("decoder.") :]] = value  # outside the reference's Decoder
        else:
            out[key] = value
    for name, buf in model.encoder.named_buffers():
        if name.endswith(("relative_position_index", "relative_coords_table")):
            out["encoder." + name] = buf  # the reference saves these window buffers
    return out


def _save_official(state: dict, path: Path) -> Path:
    import torch

    # A training file (spec pitfall 24): {'model': DataParallel state dict, 'optimizer': ...}.
    torch.save(
        {"model": {"module." + k: v for k, v in state.items()}, "optimizer": {"lr": 1e-4}},
        path,
    )
    return path


def _eval_args(dataset: str, data: Path, out: Path, *extra: str) -> list[str]:
    args = ["evaluate", "--dataset", dataset, "--data", str(data), "--out", str(out), "--quiet"]
    return [*args, *(["--ibims-scaled-planes"] if dataset == "ibims" else []), *extra]


@pytest.mark.parametrize("dataset", ["nyu", "ibims"])
def test_checkpoint_scores_equal_its_saved_predictions(tiny_world, tiny_model, tmp_path, dataset):
    from mesadepth.evaluation.evaluate import ibims_samples, model_predictor, nyu_samples

    model, path = tiny_model
    data = tiny_world / dataset
    if dataset == "nyu":
        samples = list(nyu_samples(data / "nyu_depth_v2_labeled.mat", data / "splits.mat"))
    else:
        samples = list(ibims_samples(data))
    # Predictions made one image at a time by the existing reference path, saved as .npy.
    predict = model_predictor(model, "cpu", flip=True, shift_window=True)
    preds = tmp_path / "preds"
    preds.mkdir()
    expected = {s.name: predict(s.image) for s in samples}
    for name, p in expected.items():
        np.save(preds / f"{name}.npy", p)

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(_eval_args(dataset, data, a, "--predictions", str(preds))) == 0
    saved = tmp_path / "saved"
    assert (
        main(
            _eval_args(
                dataset,
                data,
                b,
                "--checkpoint",
                str(path),
                "--device",
                "cpu",
                "--save-predictions",
                str(saved),
            )
        )
        == 0
    )
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["n_images"] == len(samples) > 0
    assert ra["mean"] == rb["mean"] and ra["per_image"] == rb["per_image"]  # exact
    assert rb["source"]["format"] == "mesadepth" and rb["source"]["flip"] is True
    for name, p in expected.items():
        assert np.array_equal(np.load(saved / f"{name}.npy"), p)
    # The protocol matters: without flip averaging the scores change.
    c = tmp_path / "c.json"
    assert main(_eval_args(dataset, data, c, "--checkpoint", str(path), "--no-flip")) == 0
    assert json.loads(c.read_text())["per_image"] != rb["per_image"]


def test_batched_evaluation_matches_one_image_at_a_time(tiny_world, tiny_model, tmp_path):
    from mesadepth.evaluation.evaluate import model_batch_predictor, model_predictor

    model, path = tiny_model
    one, two = tmp_path / "1.json", tmp_path / "2.json"
    data = tiny_world / "nyu"
    assert main(_eval_args("nyu", data, one, "--checkpoint", str(path))) == 0
    assert main(_eval_args("nyu", data, two, "--checkpoint", str(path), "--batch", "2")) == 0
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert [m["name"] for m in r1["per_image"]] == [m["name"] for m in r2["per_image"]]
    for k, v in r1["mean"].items():
        assert r2["mean"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # Mixed sizes in one call: grouped by size, returned in input order, each equal to the
    # one-image path; a 200 x 48 panorama gets enough windows to be covered (no NaN strip).
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, s, dtype=np.uint8) for s in [(48, 64, 3), (60, 80, 3), (48, 64, 3)]
    ]
    batched = model_batch_predictor(model)(images)
    single = model_predictor(model)
    for im, got in zip(images, batched, strict=True):
        np.testing.assert_allclose(got, single(im), rtol=1e-5, atol=1e-6)
    wide = model_batch_predictor(model)([rng.integers(0, 256, (48, 200, 3), dtype=np.uint8)])[0]
    assert wide.shape == (48, 200) and np.isfinite(wide).all()


def test_official_layout_checkpoint_loads_strictly_and_predicts_identically(
    tiny_world, tiny_model, tmp_path
):
    import torch

    from mesadepth.errors import DataError
    from mesadepth.models.depth_head import load_official_depth_model

    model, path = tiny_model
    state = _official_layout(model)
    assert "encoder.layers.0.downsample.reduction.weight" in state  # really the other layout
    assert "encoder.norm3.weight" in state and "last_layer_depth.2.bias" in state
    pth = _save_official(state, tmp_path / "official.pth")
    loaded = load_official_depth_model(pth, "tiny-cpu", max_depth=model.decoder.max_depth).eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.decoder.config == model.decoder.config

    # Through the command: the same metrics as the project file.
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    data = tiny_world / "nyu"
    assert main(_eval_args("nyu", data, a, "--checkpoint", str(path))) == 0
    assert main(_eval_args("nyu", data, b, "--checkpoint", str(pth), "--encoder", "tiny-cpu")) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["per_image"] == rb["per_image"] and rb["source"]["format"] == "official"

    # Mismatches are named.
    broken = dict(state)
    del broken["last_layer_depth.2.bias"]
    with pytest.raises(DataError, match=r"missing key\(s\): last_layer_depth\.2\.bias"):
        load_official_depth_model(_save_official(broken, tmp_path / "b1.pth"), "tiny-cpu")
    broken = {**state, "encoder.layers.0.blocks.0.attn.gate": torch.zeros(1)}
    with pytest.raises(
        DataError,
        match=r"encoder\.\* part: .*unexpected key\(s\): layers\.0\.blocks\.0\.attn\.gate",
    ):
        load_official_depth_model(_save_official(broken, tmp_path / "b2.pth"), "tiny-cpu")
    broken = {**state, "head.fc.weight": torch.zeros(2)}
    with pytest.raises(DataError, match=r"outside encoder.*head\.fc\.weight"):
        load_official_depth_model(_save_official(broken, tmp_path / "b3.pth"), "tiny-cpu")
    broken = {k: v for k, v in state.items() if not k.startswith("encoder.layers.3.")}
    with pytest.raises(DataError, match=r"missing key\(s\): layers\.3\.blocks\.0"):
        load_official_depth_model(_save_official(broken, tmp_path / "b4.pth"), "tiny-cpu")
    with pytest.raises(DataError, match="head takes 128-channel features but encoder"):
        load_official_depth_model(pth, "tiny-cpu", {"embed_dim": 8, "num_heads": [1, 1, 1, 1]})
    # The paper's default encoder (Swin-v2-L) cannot take the tiny weights: one clear line.
    code = main(_eval_args("nyu", data, tmp_path / "c.json", "--checkpoint", str(pth)))
    assert code == 2


def test_checkpoint_and_predictions_options_are_exclusive(tiny_world, tiny_model, tmp_path, capsys):
    _, path = tiny_model
    data = tiny_world / "nyu"
    out = tmp_path / "m.json"
    for extra in ([], ["--checkpoint", str(path), "--predictions", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main(_eval_args("nyu", data, out, *extra))
        assert exc.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(_eval_args("nyu", data, out, "--predictions", str(tmp_path), "--no-flip")) == 2
    assert "--no-flip only apply with --checkpoint" in capsys.readouterr().err
    # A project file records its encoder: --encoder is refused instead of silently ignored.
    assert (
        main(_eval_args("nyu", data, out, "--checkpoint", str(path), "--encoder", "tiny-cpu")) == 2
    )
    assert "only apply to official .pth" in capsys.readouterr().err
    assert main(_eval_args("nyu", data, out, "--checkpoint", str(tmp_path / "none.pth"))) == 2
    assert "missing depth model checkpoint" in capsys.readouterr().err
    assert not out.exists()
