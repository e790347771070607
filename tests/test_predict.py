"""`mesadepth predict`: depth .npy / 16-bit PNG / colour previews for any images."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from mesadepth.cli import main
from mesadepth.commands.predict import collect_images, colorize, depth_to_png16
from mesadepth.errors import ConfigError
from mesadepth.evaluation.evaluate import model_predictor
from mesadepth.io import read_png_uint16, read_rgb, write_jpeg, write_png
from mesadepth.models.backbone import build_encoder
from mesadepth.models.depth_head import DepthModel, save_depth_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model = DepthModel.from_encoder(build_encoder("tiny-cpu"), num_filters=(8, 8, 8)).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0, 0.05)  # away from the near-constant initial output
    path = save_depth_model(model, tmp_path_factory.mktemp("model") / "model.safetensors")
    return model, path


def _image(h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 80 * np.sin(xx / 5.0 + seed)[..., None] * np.cos(yy / 7.0)[..., None]
    noise = np.random.default_rng(seed).integers(-20, 20, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_predict_writes_three_consistent_files_for_two_image_sizes(tiny_model, tmp_path, capsys):
    model, path = tiny_model
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    write_png(src / "small.png", _image(48, 64, 0))
    write_jpeg(src / "sub" / "big.jpg", _image(60, 80, 1))
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(path), str(src), "--out", str(out), "--quiet"]
    assert main([*args, "--max-depth", "10", "--batch", "2"]) == 0
    assert "2 image(s)" in capsys.readouterr().out
    reference = model_predictor(model, "cpu", flip=True, shift_window=True)
    cmap = matplotlib.colormaps["magma_r"]
    for stem, image, shape in (
        ("small", src / "small.png", (48, 64)),
        ("big", src / "sub" / "big.jpg", (60, 80)),
    ):
        depth = np.load(out / f"{stem}.npy")
        assert depth.dtype == np.float32 and depth.shape == shape
        # The one-image protocol path gives the same depth (the batch groups sizes).
        np.testing.assert_allclose(depth, reference(read_rgb(image)), rtol=1e-5, atol=1e-6)
        mm = read_png_uint16(out / f"{stem}_depth.png")
        assert np.array_equal(mm, np.round(depth.astype(np.float64) * 1000).astype(np.uint16))
        assert 0 < depth.min() and depth.max() < model.decoder.max_depth
        preview = read_rgb(out / f"{stem}_preview.png")
        assert preview.shape == (*shape, 3)
        assert np.array_equal(preview, cmap(depth / 10.0, bytes=True)[..., :3])  # fixed 0..10 m
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{x}" for s in ("small", "big") for x in (".npy", "_depth.png", "_preview.png")
    )


def test_png16_and_preview_conversions_by_hand():
    depth = np.array([[1.2344, 1.2346, 70.0], [-1.0, np.nan, 0.0]])
    assert depth_to_png16(depth).tolist() == [[1234, 1235, 65535], [0, 0, 0]]
    cmap = matplotlib.colormaps["viridis"]
    d = np.array([[1.0, 2.0], [3.0, 5.0]])
    per_image = colorize(d, cmap)  # scale 1 .. 5 (this image's minimum .. maximum)
    assert np.array_equal(per_image, cmap(np.array([[0, 0.25], [0.5, 1.0]]), bytes=True)[..., :3])
    fixed = colorize(d, cmap, max_depth=4.0)  # 0 .. 4 m; 5 m is beyond: the end colour
    assert np.array_equal(fixed, cmap(np.array([[0.25, 0.5], [0.75, 1.0]]), bytes=True)[..., :3])
    flat = colorize(np.full((2, 2), 3.0), cmap)  # a constant map: the start colour, no 0 / 0
    assert np.array_equal(flat, cmap(np.zeros((2, 2)), bytes=True)[..., :3])


def test_name_collisions_are_refused_or_prefixed(tiny_model, tmp_path, capsys):
    _, path = tiny_model
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "img.png", _image(48, 64, 2))
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(path), str(tmp_path / "a"), str(tmp_path / "b")]
    assert main([*args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "a/img.png" in err and "b/img.png" in err and "--prefix-parent" in err
    assert not out.exists()  # refused before any work
    assert main([*args, "--out", str(out), "--quiet", "--prefix-parent"]) == 0
    assert (out / "a_img.npy").is_file() and (out / "b_img_depth.png").is_file()
    # The same file given twice is one input, not a collision.
    assert len(collect_images([tmp_path / "a" / "img.png", tmp_path / "a"])) == 1


def test_outputs_inside_the_input_folder_are_not_read_back(tiny_model, tmp_path):
    _, path = tiny_model
    write_png(tmp_path / "x.png", _image(48, 64, 3))
    args = ["predict", "--checkpoint", str(path), str(tmp_path), "--out", str(tmp_path / "d")]
    assert main([*args, "--quiet"]) == 0
    assert main([*args, "--quiet"]) == 0  # a re-run sees x.png only
    assert [p for _, p in collect_images([tmp_path], exclude=tmp_path / "d")] == ["x"]
    (tmp_path / "y_preview.png").write_bytes((tmp_path / "d" / "x_preview.png").read_bytes())
    assert [p for _, p in collect_images([tmp_path], exclude=tmp_path / "d")] == ["x"]


def test_bad_inputs_give_one_clear_line(tiny_model, tmp_path, capsys):
    _, path = tiny_model
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = ["predict", "--checkpoint", str(path), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*base, str(bad.parent)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot decode" in err and len(err.strip().splitlines()) == 1
    assert main([*base, str(tmp_path / "nope.jpg")]) == 2
    assert "missing input image or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, str(tmp_path / "empty")]) == 2
    assert "no image found" in capsys.readouterr().err
    write_png(tmp_path / "ok.png", _image(48, 64, 4))
    assert main([*base, str(tmp_path / "ok.png"), "--colormap", "magam_r"]) == 2
    assert "unknown colormap 'magam_r'; close: magma_r" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "ok.png"), "--encoder", "tiny-cpu"]) == 2
    assert "only apply to official .pth" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--batch must be >= 1"):
        from mesadepth.commands.predict import predict_images

        predict_images(lambda ims: ims, [], tmp_path, batch=0)


def test_key_value_items_reach_the_encoder(tiny_model, tmp_path, capsys):
    _, path = tiny_model
    write_png(tmp_path / "x.png", _image(48, 64, 5))
    base = ["predict", "--checkpoint", str(path), str(tmp_path / "x.png")]
    # img_size is an encoder setting: opening the 64-px model at 32 px changes the prediction.
    assert main([*base, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main([*base, "img_size=32", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = np.load(tmp_path / "a" / "x.npy"), np.load(tmp_path / "b" / "x.npy")
    assert a.shape == b.shape == (48, 64) and not np.array_equal(a, b)
    assert main([*base, "no_such_key=1", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "no_such_key" in capsys.readouterr().err
