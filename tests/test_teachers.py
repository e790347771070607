"""Teachers and conversions (teacher-and-cka.md A5-A8): encoding, specs, hf, files, mesadepth."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_depth_anything_model

from mesadepth import teachers as T
from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.io import read_png_uint16, write_png


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- A5 encoding


def test_encoding_is_float32_ratio_times_60000_truncated(tmp_path):
    d = np.array([[0.5, 1.0], [2.0, 4.0]], np.float32)
    np.testing.assert_array_equal(T.encode_pseudo_depth(d), [[7500, 15000], [30000, 60000]])
    # Truncation, not rounding: 2/7 of the max -> 17142.857 -> 17142.
    code = T.encode_pseudo_depth(np.array([[2.0, 7.0]], np.float32))
    assert code.dtype == np.uint16 and code.tolist() == [[17142, 60000]]
    # Order and precision as the reference (A2 step 8): float32 (31.5 / 30000) * 60000 =
    # 62.999996 -> 62, whereas 31.5 * (60000 / 30000) would give 63.
    code = T.encode_pseudo_depth(np.array([[31.5, 30000.0]], np.float32))
    assert code.tolist() == [[62, 60000]]
    # Against the formula on a random map, then through a real 16-bit PNG.
    rng = np.random.default_rng(0)
    depth = (rng.random((48, 64)) * 7 + 0.01).astype(np.float32)
    code = T.encode_pseudo_depth(depth)
    expected = ((depth / depth.max()) * np.float32(60000)).astype(np.uint16)
    np.testing.assert_array_equal(code, expected)
    assert int(code.max()) == 60000
    write_png(tmp_path / "d.png", code)
    back = read_png_uint16(tmp_path / "d.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, code)
    # Re-encoding an encoded map keeps it bit-exact (files teacher round trip).
    np.testing.assert_array_equal(T.encode_pseudo_depth(back.astype(np.float32)), code)


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 2)), np.array([[1.0, -1.0]]), np.array([[np.nan, 1.0]]), np.ones(3)]
)
def test_encoding_refuses_bad_maps(bad):
    with pytest.raises(ValueError):
        T.encode_pseudo_depth(bad)


def test_disparity_and_metric_conversions_a6_4():
    disp = np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)
    depth = T.disparity_to_depth(disp)  # d / max = 0, .25, .5, 1 -> 1 / (x + 0.01)
    np.testing.assert_allclose(depth, [[100.0, 1 / 0.26], [1 / 0.51, 1 / 1.01]], rtol=1e-6)
    assert depth.dtype == np.float32
    # Bicubic undershoot is clamped before inverting; the scale of d does not matter.
    np.testing.assert_allclose(T.disparity_to_depth(np.array([[-0.1, 2.0]])), [[100, 1 / 1.01]])
    np.testing.assert_allclose(T.disparity_to_depth(disp * 37.0), depth, rtol=1e-6)
    np.testing.assert_allclose(
        T.disparity_to_depth(disp, delta=0.1), 1 / (disp / 2 + 0.1), rtol=1e-6
    )
    np.testing.assert_allclose(
        T.metric_to_depth(np.array([[0.0, 1.0, 2.0, -0.5]])), [[0.02, 1.02, 2.02, 0.02]]
    )
    with pytest.raises(ValueError, match="zero everywhere"):
        T.disparity_to_depth(np.zeros((2, 2)))


# ----------------------------------------------------------------------------- specs


def test_spec_parsing_and_errors():
    s = T.parse_teacher_spec("leres:resnet50:/w/res50.pth,input_size=448,resize=torch")
    assert (s.kind, s.backbone, s.target) == ("leres", "resnet50", "/w/res50.pth")
    assert s.options == {"input_size": "448", "resize": "torch"}
    s = T.parse_teacher_spec("leres:/w/res101.pth")
    assert (s.backbone, s.target) == (None, "/w/res101.pth")
    s = T.parse_teacher_spec("hf:/m/a,b,output=depth")  # a comma inside the path stays
    assert (s.target, s.options) == ("/m/a,b", {"output": "depth"})
    with pytest.raises(ConfigError, match="leres, hf, files, mesadepth"):
        T.build_teacher("midas:/x")
    with pytest.raises(ConfigError, match="no kind"):
        T.build_teacher("/just/a/path")
    with pytest.raises(ConfigError, match="unknown option 'colour'.*kind, delta"):
        T.build_teacher("files:/x,colour=red")
    with pytest.raises(ConfigError, match="per_image_min"):
        T.build_teacher("leres:resnet50:/x.pth,per_image_min=maybe")
    with pytest.raises(MissingFileError, match="res101.pth"):
        T.build_teacher("leres:resnext101:/nowhere/res101.pth", device="cpu")
    with pytest.raises(MissingFileError, match="finetune"):
        T.build_teacher("mesadepth:/nowhere/model.safetensors", device="cpu")
    with pytest.raises(MissingFileError, match="precomputed"):
        T.build_teacher("files:/nowhere")


# ----------------------------------------------------------------------------- LeReS teacher


def test_leres_teacher_batches_like_single_images(tmp_path):
    from test_leres import tiny_leres

    path = tmp_path / "tiny.pth"
    torch.save(
        {"depth_model": {"module." + k: v for k, v in tiny_leres().state_dict().items()}}, path
    )
    teacher = T.LeReSTeacher(path, device="cpu", input_size=64, model=tiny_leres(7))
    images = [_image(48, 64, 0), _image(48, 64, 1), _image(30, 20, 2)]
    batch = teacher.predict(images)
    single = [teacher.predict([im])[0] for im in images]
    for b, s, im in zip(batch, single, images, strict=True):
        assert b.shape == im.shape[:2] and b.dtype == np.float32
        assert float(b.min()) > 0
        # Thread-level float noise only (spec A2: compare within ~1e-4 x max).
        np.testing.assert_allclose(b, s, rtol=0, atol=1e-4 * float(s.max()))
    # The reference's whole-batch minimum would make batched results depend on the batch.
    ref_rule = T.LeReSTeacher(
        path, device="cpu", input_size=64, per_image_min=False, model=tiny_leres(7)
    )
    coupled = ref_rule.predict(images)
    assert max(float(np.abs(c - s).max()) for c, s in zip(coupled, single, strict=True)) > 1e-4
    assert "per_image_min=true" in teacher.spec and teacher.metadata["input_size"] == [64, 64]


@pytest.fixture(scope="module")
def tiny_leres_file(tmp_path_factory):
    """A tiny LeReS saved in the released layout, and the network to load it into."""
    from test_leres import tiny_leres

    path = tmp_path_factory.mktemp("leres") / "tiny.pth"
    net = tiny_leres()
    torch.save({"depth_model": net.state_dict()}, path)
    return path, net


def test_leres_teacher_default_is_the_reference_pipeline(tiny_leres_file):
    """Default teacher = the reference's own calls (A2): cv2.resize of the RGB frame to the
    input size, /255, mean/std, LeReS, raw - min + 0.01, cv2.resize back; no warning."""
    import warnings

    import cv2

    from mesadepth.models.leres import IMAGENET_MEAN, IMAGENET_STD

    path, net = tiny_leres_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher = T.LeReSTeacher(path, device="cpu", input_size=64, model=net)
    assert teacher.resize == "opencv" and "resize=opencv" in teacher.spec
    assert teacher.metadata["resize"] == "opencv"
    assert teacher.metadata["reference_deviation"] is None
    for img in (_image(48, 64, 3), _image(37, 50, 4)):
        rgb = cv2.resize(img, (64, 64))
        x = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255)
        x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
            :, None, None
        ]
        with torch.no_grad():
            raw = net(x[None])
        pred = (raw - raw.min() + 0.01).numpy()[0, 0]
        ref = cv2.resize(pred, (img.shape[1], img.shape[0]))
        got = teacher.predict([img])[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(ref.max()))
        # Within thread-level noise (A2: uint16 within 2); the torch resize moves far more.
        codes = T.encode_pseudo_depth(got).astype(int) - T.encode_pseudo_depth(ref)
        assert np.abs(codes).max() <= 2


def test_leres_forced_torch_resize_warns_and_is_recorded(tiny_leres_file, tmp_path):
    """resize=torch: a warning says what changes; the summary and teacher.json record it."""
    from mesadepth.data.video import write_video_scene

    path, net = tiny_leres_file
    with pytest.warns(UserWarning, match="resize=torch: .*OpenCV.*pseudo-depth"):
        teacher = T.LeReSTeacher(path, device="cpu", input_size=64, resize="torch", model=net)
    assert teacher.resize == "torch" and "resize=torch" in teacher.spec
    note = teacher.metadata["reference_deviation"]
    assert note.startswith("resize=torch") and "resize=opencv" in note
    frames = np.stack([_image(48, 64, i) for i in range(3)])
    write_video_scene(tmp_path / "video" / "training" / "s0", frames, np.eye(3))
    summary = T.write_pseudo_depth_tree(teacher, tmp_path / "video", progress=False)
    assert summary["teacher"]["resize"] == "torch"
    assert summary["teacher"]["reference_deviation"] == note
    record = json.loads((tmp_path / "video/training/s0/leres_depth/teacher.json").read_text())
    assert record["teacher"]["reference_deviation"] == note
    # What it changes: the same frames through the reference resize give other pseudo-depth.
    reference = T.LeReSTeacher(path, device="cpu", input_size=64, model=net)
    torch_codes = [T.encode_pseudo_depth(d) for d in teacher.predict(list(frames))]
    ref_codes = [T.encode_pseudo_depth(d) for d in reference.predict(list(frames))]
    assert any(not np.array_equal(a, b) for a, b in zip(torch_codes, ref_codes, strict=True))


# ----------------------------------------------------------------------------- hf teacher


@pytest.fixture(scope="module")
def tiny_depth_anything(tmp_path_factory):
    model = tiny_depth_anything_model(56).eval()
    from transformers import DPTImageProcessor

    with torch.no_grad():  # random init predicts ~0 everywhere; make the map vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
        model.head.conv3.bias.fill_(1.0)
    folder = tmp_path_factory.mktemp("tiny_da")
    model.save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def test_hf_teacher_offline_depth_anything_inverted_per_a6_4(tiny_depth_anything):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    teacher = T.build_teacher(f"hf:{tiny_depth_anything}", device="cpu")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert teacher.output == "inverse_relative"  # relative Depth Anything predicts disparity
    img = _image(60, 90)
    # Independent path: processor -> model -> bicubic to (H, W) -> clamp -> A6.4 step 2.
    model = AutoModelForDepthEstimation.from_pretrained(tiny_depth_anything, local_files_only=True)
    proc = AutoImageProcessor.from_pretrained(tiny_depth_anything, local_files_only=True)
    from PIL import Image

    pixels = proc(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 56, 84)  # keep aspect, multiples of 14 (A6.2)
    with torch.no_grad():
        pred = model.eval()(pixel_values=pixels).predicted_depth
    disp = torch.nn.functional.interpolate(
        pred[:, None], size=(60, 90), mode="bicubic", align_corners=False
    )[0, 0].numpy()
    disp = np.clip(disp, 0, None)
    assert disp.max() > 0 and disp.std() > 0
    expected = (1.0 / (disp / disp.max() + 0.01)).astype(np.float32)
    (depth,) = teacher.predict([img])
    assert depth.shape == (60, 90) and depth.dtype == np.float32
    np.testing.assert_allclose(depth, expected, rtol=1e-4)
    # Nearer (larger disparity) -> smaller depth; bounded by the delta rule.
    assert depth.min() >= 1 / 1.01 - 1e-6 and depth.max() <= 100 + 1e-3
    assert np.corrcoef(depth.ravel(), disp.ravel())[0, 1] < 0
    # The explicit metric rule instead, and the processor / conversion recorded.
    metric = T.build_teacher(f"hf:{tiny_depth_anything},output=depth,delta=0.05", device="cpu")
    np.testing.assert_allclose(
        metric.predict([img])[0], disp + 0.05 * disp.max(), rtol=1e-4, atol=1e-5
    )
    meta = teacher.metadata
    assert (
        meta["output"] == "inverse_relative" and meta["preprocessing"]["ensure_multiple_of"] == 14
    )
    assert "1 / (d / max(d) + 0.01)" in meta["conversion"]


def test_hf_output_kind_inference_and_missing_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    assert T.infer_hf_output(transformers.DPTConfig()) == "inverse_relative"  # MiDaS DPT
    dino = transformers.DPTConfig(
        backbone_config=transformers.Dinov2Config(out_features=["stage1"]), is_hybrid=False
    )
    assert T.infer_hf_output(dino) == "depth"
    metric = transformers.DepthAnythingConfig(depth_estimation_type="metric")
    assert T.infer_hf_output(metric) == "depth"
    assert T.infer_hf_output(transformers.GLPNConfig()) == "depth"
    with pytest.raises(MissingFileError, match="config.json"):
        T.build_teacher(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(MissingFileError, match="preprocessor_config.json"):
        T.build_teacher(f"hf:{tmp_path / 'm'}")


# ----------------------------------------------------------------------------- files teacher


def test_files_teacher_reads_pngs_and_npy_by_position(tmp_path):
    src = tmp_path / "pre"
    rng = np.random.default_rng(0)
    codes = [rng.integers(1, 60000, (6, 8)).astype(np.uint16) for _ in range(3)]
    for k, c in enumerate(codes):
        c[0, 0] = 60000
        write_png(src / "s1" / "leres_depth" / f"x{k}.png", c)
    disp = [rng.random((6, 8)).astype(np.float32) + 0.1 for _ in range(2)]
    (src / "s2").mkdir()
    for k, d in enumerate(disp):
        np.save(src / "s2" / f"{k:03d}.npy", d)
    images = [np.zeros((6, 8, 3), np.uint8)] * 3
    t = T.build_teacher(f"files:{src}")
    out = t.predict(images, [T.FrameRef("s1", k, 3) for k in (2, 0, 1)])
    for o, k in zip(out, (2, 0, 1), strict=True):
        assert o.dtype == np.float32
        np.testing.assert_array_equal(o, codes[k].astype(np.float32))  # raw, no rescaling
    inv = T.build_teacher(f"files:{src},kind=inverse,delta=0.02")
    got = inv.predict(images[:2], [T.FrameRef("s2", 1, 2), T.FrameRef("s2", 0, 2)])
    np.testing.assert_allclose(got[0], 1 / (disp[1] / disp[1].max() + 0.02), rtol=1e-6)
    with pytest.raises(DataError, match="holds 3 .*4 frame"):
        T.FilesTeacher(src).predict(images[:1], [T.FrameRef("s1", 0, 4)])
    with pytest.raises(DataError, match="8x6 .*is 5x4"):
        t.predict([np.zeros((4, 5, 3), np.uint8)], [T.FrameRef("s1", 0, 3)])
    with pytest.raises(ConfigError, match="needs the frame"):
        t.predict(images[:1])


# ----------------------------------------------------------------------------- mesadepth


def test_mesadepth_teacher_matches_the_evaluation_protocol(tmp_path):
    from mesadepth.evaluation.evaluate import model_predictor
    from mesadepth.models.backbone import build_encoder
    from mesadepth.models.depth_head import DepthModel, save_depth_model

    torch.manual_seed(0)
    model = DepthModel.from_encoder(build_encoder("tiny-cpu"), num_filters=(8, 8, 8)).eval()
    for p in model.decoder.parameters():
        p.data.normal_(0, 0.05)
    path = save_depth_model(model, tmp_path / "model.safetensors")
    teacher = T.build_teacher(f"mesadepth:{path}", device="cpu")
    images = [_image(48, 64, 0), _image(48, 64, 1), _image(40, 30, 2)]
    got = teacher.predict(images)
    ref = model_predictor(model, "cpu", flip=True, shift_window=True)
    for g, im in zip(got, images, strict=True):
        assert g.shape == im.shape[:2] and g.dtype == np.float32 and float(g.min()) > 0
        np.testing.assert_allclose(g, ref(im), rtol=1e-5, atol=1e-6)
    assert teacher.metadata["input_size"] == [64, 64]
    assert isinstance(teacher, T.Teacher)
