"""Xie et al. depth head and the encoder + head model (spec 2.1, 2.2, pitfalls 11, 15)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mesadepth.errors import ConfigError, DataError
from mesadepth.models.backbone import build_encoder
from mesadepth.models.depth_head import DECONV_CONFIG, DepthModel, XieDepthHead


def _head(**kw) -> XieDepthHead:
    torch.manual_seed(0)
    # Tiny widths, the reference structure: 3 deconvs, conv to embed_dim, x4, conv-ReLU-conv.
    args = {"in_channels": 24, "embed_dim": 8, "num_filters": (4, 4, 4)}
    args.update(kw)
    return XieDepthHead(**args)


def test_layer_shapes_for_a_15x15_map_follow_the_spec_table():
    head = _head()
    shapes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for m in (*head.deconv_layers[2::3], head.conv_layers[2])
    ]
    feats = torch.randn(2, 24, 15, 15)
    out = head(feats)
    for h in hooks:
        h.remove()
    # Spec 2.2 rows 1-4 (with C=24 -> 4 -> 4 -> 4, embed 8 instead of 1536 -> 32 ... -> 192).
    assert shapes == [(2, 4, 30, 30), (2, 4, 60, 60), (2, 4, 120, 120), (2, 8, 120, 120)]
    assert out.shape == (2, 1, 480, 480)
    assert head.stride == 32


def test_module_configuration_matches_the_spec():
    head = _head()
    deconvs = [m for m in head.deconv_layers if isinstance(m, nn.ConvTranspose2d)]
    bns = [m for m in head.deconv_layers if isinstance(m, nn.BatchNorm2d)]
    assert len(deconvs) == 3 and len(bns) == 3
    for d in deconvs:
        assert d.kernel_size == (2, 2) and d.stride == (2, 2)
        assert d.padding == (0, 0) and d.output_padding == (0, 0)
        assert d.bias is None
    conv, bn, _ = head.conv_layers
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert conv.bias is not None and conv.out_channels == 8
    for b in [*bns, bn]:
        # PyTorch BatchNorm defaults (spec 2.2).
        assert b.eps == 1e-5 and b.momentum == 0.1 and b.affine
    assert head.up.mode == "bilinear" and head.up.align_corners is False
    assert head.up.scale_factor == 2
    c1, relu, c2 = head.last_layer_depth
    assert (c1.in_channels, c1.out_channels, c2.out_channels) == (8, 8, 1)
    assert isinstance(relu, nn.ReLU) and c2.padding == (1, 1) and c2.bias is not None


def test_deconv_kernel_table_and_every_kernel_doubles_the_size():
    assert DECONV_CONFIG == {4: (1, 0), 3: (1, 1), 2: (0, 0)}
    head = _head(deconv_kernels=(4, 3, 2))
    k = [m.kernel_size[0] for m in head.deconv_layers if isinstance(m, nn.ConvTranspose2d)]
    assert k == [4, 3, 2]
    assert head(torch.randn(1, 24, 5, 7)).shape == (1, 1, 160, 224)
    with pytest.raises(ConfigError):
        _head(deconv_kernels=(5, 2, 2))


def test_initialisation_and_initial_prediction_is_half_max_depth():
    head = _head(in_channels=256, embed_dim=64, num_filters=(32, 32, 32))
    for m in head.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            w = m.weight.detach()
            assert abs(w.std().item() - 0.001) < 0.1 * 0.001, m
            assert abs(w.mean().item()) < 2e-4
            if m.bias is not None:
                assert torch.all(m.bias == 0)
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    feats = torch.randn(2, 256, 3, 3)
    # sigmoid(~0) x 10. Train-mode BN rescales activations to unit variance, so logits reach
    # ~1e-3; with BN's initial running stats (0, 1) the 0.001 weights leave ~1e-7.
    for train, tol in ((True, 1e-2), (False, 1e-5)):
        head.train(train)
        with torch.no_grad():
            pred = head(feats)
        assert torch.allclose(pred, torch.full_like(pred, 5.0), atol=tol)
    # A default (Kaiming) initialisation would not be anywhere near 5 m everywhere.
    default = XieDepthHead(256, 64, num_filters=(32, 32, 32))
    for m in default.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.reset_parameters()
    with torch.no_grad():
        assert (default.eval()(feats) - 5.0).abs().max() > 1e-2


def test_output_is_sigmoid_times_max_depth():
    head = _head(max_depth=10.0)
    last = head.last_layer_depth[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(0.25 / 0.75))  # logit(0.25)
    pred = head(torch.randn(1, 24, 2, 2))
    assert torch.allclose(pred, torch.full_like(pred, 2.5), atol=1e-6)
    head8 = _head(max_depth=8.0)
    with torch.no_grad():
        head8.last_layer_depth[2].weight.zero_()
        head8.last_layer_depth[2].bias.fill_(50.0)
    assert torch.allclose(head8(torch.randn(1, 24, 2, 2)), torch.tensor(8.0))


def test_depth_model_feeds_raw_rgb_and_uses_encoder_decoder_prefixes():
    torch.manual_seed(0)
    encoder = build_encoder("tiny-cpu")  # 64 px, embed 16 -> last stage 128 x 2 x 2
    model = DepthModel.from_encoder(encoder, num_filters=(4, 4, 4)).eval()
    assert model.head.in_channels == 128 and model.head.embed_dim == 16
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"encoder", "decoder"}
    assert "decoder.last_layer_depth.2.weight" in model.state_dict()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        # Pitfall 11: exactly head(encoder(x)) with x as given, no mean/std normalisation.
        expected = model.decoder(encoder.forward_features_masked(x))
    assert out.shape == (2, 1, 64, 64)
    assert torch.equal(out, expected)
    assert bool(((out > 0) & (out < 10)).all())
    with pytest.raises(ValueError):
        model(torch.rand(2, 1, 64, 64))


def test_depth_model_round_trips_through_safetensors(tmp_path):
    from mesadepth.models.backbone import save_encoder
    from mesadepth.models.depth_head import load_depth_model, save_depth_model

    torch.manual_seed(0)
    encoder = build_encoder("tiny-cpu", img_size=64)
    model = DepthModel.from_encoder(encoder, max_depth=7.5, num_filters=(16, 16, 16)).eval()
    for p in model.decoder.parameters():
        p.data.normal_(0, 0.05)  # away from the near-constant initial output
    path = save_depth_model(model, tmp_path / "model.safetensors", metadata={"stage": "finetune"})
    loaded = load_depth_model(path).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.decoder.max_depth == 7.5
    # An encoder-only file (a pre-training stage's output) is refused with a clear reason.
    save_encoder(encoder, tmp_path / "encoder.safetensors")
    with pytest.raises(DataError, match="not a fine-tuned depth model"):
        load_depth_model(tmp_path / "encoder.safetensors")
