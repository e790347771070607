"""LeReS network (teacher-and-cka.md A2-A4): key layout, counts, FTB quirk, loading, shift rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.models import leres as L

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_leres(seed: int = 0) -> L.LeReS:
    """A LeReS with the released key structure at 1/16 width and one block per stage."""
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    enc = ResNet(
        Bottleneck,
        (1, 1, 1, 1),
        channels=(4, 8, 16, 32),
        stem_width=8,
        num_classes=0,
        global_pool="",
    )
    model = L.LeReS(enc, in_channels=(16, 32, 64, 128), mid_channels=(8, 8, 8, 16))
    # Random BN statistics and affine terms, so that eval-mode BN is not an identity.
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.normal_(m.weight, std=0.2, generator=gen)
    return model.eval()


@pytest.mark.parametrize("backbone", ["resnet50", "resnext101"])
def test_state_dict_keys_and_shapes_equal_the_reference(backbone):
    path = SHARED_DATA / f"leres_{backbone}_state_dict_shapes.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared spec data lives in ../shared/data)")
    ref = json.loads(path.read_text())
    sd = L.build_leres(backbone, device="meta").state_dict()
    # Same keys in the same order, same shapes (num_batches_tracked: []).
    assert list(sd) == list(ref)
    assert {k: list(v.shape) for k, v in sd.items()} == ref


@pytest.mark.parametrize(
    "backbone,entries,bn,params,enc_params",
    [
        ("resnet50", 406, 61, 52_126_529, 23_508_032),
        ("resnext101", 712, 112, 115_360_833, 86_742_336),
    ],
)
def test_parameter_counts_a3_5(backbone, entries, bn, params, enc_params):
    model = L.build_leres(backbone, device="meta")
    sd = model.state_dict()
    assert len(sd) == entries
    assert sum(k.endswith("num_batches_tracked") for k in sd) == bn
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn
    assert sum(p.numel() for p in model.parameters()) == params
    enc = model.depth_model.encoder_modules
    dec = model.depth_model.decoder_modules
    assert sum(p.numel() for p in enc.parameters()) == enc_params
    assert sum(p.numel() for p in dec.parameters()) == 28_618_497
    assert len(dec.state_dict()) == 88


def test_feature_and_decoder_shapes_at_448_and_size_check():
    model = L.build_leres("resnet50", device="meta")
    shapes: dict[str, tuple[int, ...]] = {}
    dec = model.depth_model.decoder_modules
    for name in ("conv", "conv1", "ffm2", "ffm1", "ffm0", "outconv"):
        getattr(dec, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
    x = torch.empty(1, 3, 448, 448, device="meta")
    feats = model.depth_model.encoder_modules(x)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (256, 112, 112),
        (512, 56, 56),
        (1024, 28, 28),
        (2048, 14, 14),
    ]
    assert tuple(model(x).shape) == (1, 1, 448, 448)
    assert shapes == {
        "conv": (512, 14, 14),
        "conv1": (256, 14, 14),
        "ffm2": (256, 56, 56),
        "ffm1": (256, 112, 112),
        "ffm0": (256, 224, 224),
        "outconv": (1, 448, 448),
    }
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.empty(1, 3, 450, 450, device="meta"))


def test_ftb_reproduces_the_inplace_relu_of_the_reference():
    torch.manual_seed(0)
    ftb = L.FTB(3, 4).eval()
    with torch.no_grad():
        ftb.conv_branch[2].running_mean.normal_()
    x = torch.randn(2, 3, 5, 5)
    # The reference's forward, literally: its branch starts with an in-place ReLU that also
    # rewrites the tensor on the left of the addition.
    ref_branch = nn.Sequential(nn.ReLU(inplace=True), *list(ftb.conv_branch)[1:])
    with torch.no_grad():
        c = ftb.conv1(x)
        c = c + ref_branch(c)
        expected = torch.relu(c)
        got = ftb(x)
        r = torch.relu(ftb.conv1(x))
        by_formula = torch.relu(r + ftb.conv_branch[1:](r))
        naive = torch.relu(ftb.conv1(x) + ftb.conv_branch(ftb.conv1(x)))
        ftb.inplace_quirk = False
        corrected = ftb(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, by_formula, rtol=0, atol=0)
    torch.testing.assert_close(corrected, naive, rtol=0, atol=0)
    assert (got - naive).abs().max() > 1e-3  # the quirk matters


def test_encoder_equals_torchvision_resnet50_stages():
    import torchvision

    torch.manual_seed(0)
    model = L.build_leres("resnet50").eval()
    enc = model.depth_model.encoder_modules
    gen = torch.Generator().manual_seed(3)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    tv = torchvision.models.resnet50(weights=None).eval()
    sd = {k[len("encoder.") :]: v for k, v in enc.state_dict().items()}
    missing, unexpected = tv.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = enc(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        theirs = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            y = layer(y)
            theirs.append(y)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _released_layout(model: nn.Module, prefix: str = "module.") -> dict:
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    return {
        "depth_model": sd,
        "shift_model": {"module.pointnet.weight": torch.zeros(2)},
        "focal_model": {"module.pointnet.weight": torch.zeros(2)},
    }


def test_loading_the_released_nested_layout_gives_identical_outputs(tmp_path):
    src = tiny_leres(seed=0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = src(x)
    for name, obj in {
        "module_prefix.pth": _released_layout(src, "module."),
        "no_prefix.pth": _released_layout(src, ""),
        "bare.pth": dict(src.state_dict()),
        "training.pth": {
            "model_state_dict": {
                **src.state_dict(),
                "depth_model.auxi_modules.out_conv.weight": torch.zeros(1),
            },
            "epoch": 3,
        },
    }.items():
        torch.save(obj, tmp_path / name)
        loaded = L.load_leres(tmp_path / name, model=tiny_leres(seed=9))
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # Released files may lack num_batches_tracked: tolerated.
    sd = {k: v for k, v in src.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"depth_model": sd}, tmp_path / "no_nbt.pth")
    with torch.no_grad():
        out = L.load_leres(tmp_path / "no_nbt.pth", model=tiny_leres(seed=9))(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_loading_refuses_partial_prefix_and_wrong_backbone(tmp_path):
    sd = dict(tiny_leres().state_dict())
    first = next(iter(sd))
    sd["module." + first] = sd.pop(first)  # only one key prefixed: not stripped (A4 rule)
    torch.save({"depth_model": sd}, tmp_path / "partial.pth")
    with pytest.raises(DataError, match=r"1 missing .*1 unexpected"):
        L.load_leres(tmp_path / "partial.pth", model=tiny_leres())
    # A ResNeXt-101 file (layer3 has 23 blocks) opened as resnet50.
    fake = {L._ENCODER + "layer3.6.conv1.weight": torch.zeros(1)}
    torch.save({"depth_model": fake}, tmp_path / "res101.pth")
    with pytest.raises(DataError, match="resnext101 checkpoint.*backbone resnet50"):
        L.load_leres(tmp_path / "res101.pth", "resnet50")


def test_missing_checkpoint_says_what_to_download():
    with pytest.raises(MissingFileError) as err:
        L.load_leres("/nowhere/res101.pth", "resnext101")
    msg = str(err.value)
    assert "/nowhere/res101.pth" in msg and "res101.pth" in msg
    assert "AdelaiDepth" in msg and "leres:resnext101:" in msg
    with pytest.raises(MissingFileError, match="res50.pth"):
        L.load_leres("/nowhere/x.pth", "resnet50")


def test_detect_backbone_from_keys():
    assert L.detect_backbone(L.build_leres("resnext101", device="meta").state_dict()) == (
        "resnext101"
    )
    assert L.detect_backbone(L.build_leres("resnet50", device="meta").state_dict()) == "resnet50"


def test_shift_uses_the_per_image_minimum():
    raw = torch.tensor([[[[-1.0, 2.0]]], [[[3.0, 5.0]]]])  # (2, 1, 1, 2)
    per_image = L.shift_depth(raw)
    torch.testing.assert_close(per_image, torch.tensor([[[[0.01, 3.01]]], [[[0.01, 2.01]]]]))
    # The reference's batch-wide minimum (-1) couples the images.
    batch = L.shift_depth(raw, per_image=False)
    torch.testing.assert_close(batch, torch.tensor([[[[0.01, 3.01]]], [[[4.01, 6.01]]]]))
    # At batch size 1 both rules agree (the reference runs one image at a time).
    torch.testing.assert_close(L.shift_depth(raw[1:]), L.shift_depth(raw[1:], per_image=False))


def test_reference_preprocessing_rgb_order_and_normalisation():
    img = np.zeros((3, 5, 3), np.uint8)
    img[..., 0] = 255  # pure red, RGB order
    img[..., 2] = 51
    x, used = L.leres_input([img], size=64, backend="torch")
    assert used == "torch" and x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    for c, v in enumerate(expected):
        assert torch.allclose(x[0, c], torch.full((64, 64), v), atol=1e-6)
    # uint8 bilinear with half-pixel centres: a 2-pixel ramp 0/255 -> 4 pixels.
    ramp = np.zeros((1, 2, 3), np.uint8)
    ramp[0, 1] = 255
    out, _ = L.resize_uint8(ramp, 4, "torch")
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 191, 255])  # 63.75 / 191.25 rounded
    with pytest.raises(Exception, match="multiple of 32"):
        L.leres_input([img], size=450)


# ----------------------------------------------------------------------------- A2 resize (OpenCV)


def opencv_linear_uint8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV's ``INTER_LINEAR`` on uint8 (H, W, C), re-derived from its fixed-point rule.

    Source position ``(d + 0.5) * in / out - 0.5`` in float32, split into an integer index and a
    fraction. Columns outside the image are clamped to the border with fraction 0; rows keep
    their fraction and only the row indices are clipped. Weights ``1 - f`` and ``f`` are rounded
    to multiples of 1/2048. The horizontal pass is exact in integers; the vertical pass drops 4,
    then 16 bits of each weighted row before summing, and rounds the last 2 bits half up.
    """
    h, w = img.shape[:2]

    def positions(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        pos = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
        idx = np.floor(pos).astype(np.int64)
        return idx, (pos - idx.astype(np.float32)).astype(np.float32)

    def weights(frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.float32(2048)
        return (
            np.rint((np.float32(1) - frac) * scale).astype(np.int64),
            np.rint(frac * scale).astype(np.int64),
        )

    sx, fx = positions(w, out_w)
    edge = (sx < 0) | (sx >= w - 1)
    fx[edge] = 0
    sx = np.clip(sx, 0, w - 1)
    a0, a1 = weights(fx)
    sy, fy = positions(h, out_h)
    b0, b1 = weights(fy)
    px = img.astype(np.int64)
    rows = px[:, sx] * a0[None, :, None] + px[:, np.minimum(sx + 1, w - 1)] * a1[None, :, None]
    top, bottom = rows[np.clip(sy, 0, h - 1)], rows[np.clip(sy + 1, 0, h - 1)]
    acc = ((b0[:, None, None] * (top >> 4)) >> 16) + ((b1[:, None, None] * (bottom >> 4)) >> 16)
    return ((acc + 2) >> 2).astype(np.uint8)


def test_opencv_resize_pinned_to_hand_derived_values():
    """A2 step 3 with OpenCV: a 1 x 2 row [77, 166] -> 3 x 3, derived by hand.

    Columns (2 -> 3): positions -1/6, 1/2, 7/6 -> the border pixels, and (77 + 166) * 1024 =
    248832 in units of 1/2048 in the middle. Rows (1 -> 3): positions -1/3, 0, 1/3; the rows keep
    their fractions, so the weights are (683, 1365), (0, 2048) or (2048, 0), (1365, 683), all on
    the same source row. Middle column, 248832 >> 4 = 15552: row 0 gives
    (683 * 15552 >> 16) + (1365 * 15552 >> 16) = 162 + 323 = 485 -> (485 + 2) >> 2 = 121;
    row 1 gives 2048 * 15552 >> 16 = 486 -> 122; row 2 is row 0 mirrored -> 121. The exact value
    is 121.5, which torch rounds half to even: 122 on every row.
    """
    row = np.zeros((1, 2, 3), np.uint8)
    row[0, 0], row[0, 1] = 77, 166
    out, used = L.resize_uint8(row, 3, "opencv")
    assert used == "opencv" and out.dtype == np.uint8 and out.shape == (3, 3, 3)
    expected = [[77, 121, 166], [77, 122, 166], [77, 121, 166]]
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], expected)
        np.testing.assert_array_equal(opencv_linear_uint8(row, 3, 3)[:, :, c], expected)
    torch_out, used = L.resize_uint8(row, 3, "torch")
    assert used == "torch"
    np.testing.assert_array_equal(torch_out[:, :, 0], [[77, 122, 166]] * 3)


@pytest.mark.parametrize(("h", "w", "size"), [(7, 5, 4), (13, 17, 32), (48, 64, 32), (30, 20, 64)])
def test_opencv_resize_is_opencvs_fixed_point_bilinear(h, w, size):
    """The default resize equals the re-derived OpenCV rule bit for bit (up- and downscaling,
    rows wider than one SIMD register); torch is within 1 grey level of it, not equal."""
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out, used = L.resize_uint8(img, size)
    assert used == "opencv"
    np.testing.assert_array_equal(out, opencv_linear_uint8(img, size, size))
    # A read-only, channel-reversed view (a BGR frame as read) goes through as well.
    bgr = img[..., ::-1]
    bgr.flags.writeable = False
    np.testing.assert_array_equal(L.resize_uint8(bgr, size)[0], out[..., ::-1])
    diff = np.abs(L.resize_uint8(img, size, "torch")[0].astype(int) - out)
    assert diff.max() <= 1 and (diff > 0).any()
    if size % 32 == 0:  # leres_input normalises exactly this image (A2 step 4)
        x, used = L.leres_input([img], size=size)
        mean = np.array(L.IMAGENET_MEAN, np.float32)[:, None, None]
        std = np.array(L.IMAGENET_STD, np.float32)[:, None, None]
        ref = (out.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean) / std
        assert used == "opencv"
        np.testing.assert_allclose(x[0].numpy(), ref, rtol=0, atol=1e-6)


def test_float_resize_back_uses_opencv_bilinear():
    """A2 step 7: (h, w) float32 -> frame size with OpenCV's float bilinear (half-pixel)."""
    d = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    out = L.resize_float(d, 2, 4)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_allclose(out, [[0, 0.25, 0.75, 1], [2, 2.25, 2.75, 3]], rtol=0, atol=1e-7)
    np.testing.assert_allclose(L.resize_float(d, 2, 4, "torch"), out, rtol=0, atol=1e-6)


def test_resize_backend_choice_and_missing_opencv(monkeypatch):
    """opencv is required by default; auto falls back to torch only with a warning."""
    with pytest.raises(ConfigError, match="opencv, torch, auto"):
        L.resolve_resize_backend("pil")
    assert L.resolve_resize_backend("torch") == "torch"
    monkeypatch.setattr(L, "_cv2", lambda: None)
    with pytest.raises(ConfigError, match="OpenCV is not installed.*opencv-python-headless"):
        L.resolve_resize_backend("opencv")
    with pytest.raises(ConfigError, match="OpenCV is not installed"):
        L.resize_uint8(np.zeros((2, 2, 3), np.uint8), 32)
    with pytest.warns(UserWarning, match="resize=auto: OpenCV is not installed.*torch"):
        assert L.resolve_resize_backend("auto") == "torch"
