"""DepthNet and the DispNet decoder (geometric spec 2.1, 2.2, 9.3, 9.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mesadepth.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mesadepth.errors import ConfigError
from mesadepth.models.dispnet import DepthNet, DispNetDecoder, build_depthnet

TINY_DEC = (4, 8, 8, 16, 16)


def _features(channels, size=64, strides=(4, 8, 16, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, c, size // s, size // s, generator=g)
        for c, s in zip(channels, strides, strict=True)
    ]


def _level_shapes(net: DepthNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for m in net.decoder.upconvs1
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize(("bias", "disp"), [(0.0, 5.01), (60.0, 10.01), (-60.0, 0.01)])
def test_output_is_10_sigmoid_plus_0_01_and_depth_its_inverse(bias, disp):
    torch.manual_seed(0)
    net = DepthNet(
        build_depthnet("tiny-cpu").encoder, DispNetDecoder((16, 32, 64, 128), TINY_DEC)
    ).eval()
    head = net.decoder.dispconvs[0].conv
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(bias)
        depth = net(torch.randn(2, 3, 64, 64))
    # Spec 2.2: the depth range is (1/10.01, 1/0.01) = (0.0999, 100).
    torch.testing.assert_close(depth, torch.full((2, 1, 64, 64), 1.0 / disp), rtol=1e-6, atol=0)


@pytest.mark.parametrize("encoder", ["tiny-cpu", "resnet18"])
def test_random_initialisation_predicts_about_0_2_everywhere(encoder):
    torch.manual_seed(0)
    net = build_depthnet(encoder).eval()
    with torch.no_grad():
        depth = net(torch.randn(2, 3, 64, 64))
    # Spec 2.2: sigmoid ~ 0.5 at PyTorch default init -> disp ~ 5.01 -> depth ~ 0.2.
    assert abs(depth.median().item() - 0.2) < 0.01
    assert depth.min().item() > 0.17 and depth.max().item() < 0.24


def test_resnet_depthnet_levels_follow_the_spec_table():
    torch.manual_seed(0)
    net = build_depthnet("resnet18", num_ch_dec=(2, 4, 4, 8, 8)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = net.features(x)
    # Spec 2.1: f0 at H/2 (before max-pooling) .. f4 at H/32, channels 64, 64, 128, 256, 512.
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 32, 48),
        (64, 16, 24),
        (128, 8, 12),
        (256, 4, 6),
        (512, 2, 3),
    ]
    assert _level_shapes(net, x) == [
        (2, 8, 4, 6),
        (2, 8, 8, 12),
        (2, 4, 16, 24),
        (2, 4, 32, 48),
        (2, 2, 64, 96),
    ]
    # ConvBlock_b inputs: level width + skip f_{i-1} (spec 2.2 table, with these widths).
    assert [b.conv.conv.in_channels for b in net.decoder.upconvs1] == [
        8 + 256,
        8 + 128,
        4 + 64,
        4 + 64,
        2,
    ]
    assert net(x).shape == (2, 1, 64, 96)


def test_default_resnet_decoder_has_the_reference_shapes():
    net = build_depthnet("resnet18")
    sd = net.decoder.state_dict()
    assert [tuple(sd[f"upconvs0.{j}.conv.conv.weight"].shape[:2]) for j in range(5)] == [
        (256, 512),
        (128, 256),
        (64, 128),
        (32, 64),
        (16, 32),
    ]
    assert [tuple(sd[f"upconvs1.{j}.conv.conv.weight"].shape[:2]) for j in range(5)] == [
        (256, 512),
        (128, 256),
        (64, 128),
        (32, 96),
        (16, 16),
    ]
    assert [tuple(sd[f"dispconvs.{j}.conv.weight"].shape[:2]) for j in range(4)] == [
        (1, 16),
        (1, 32),
        (1, 64),
        (1, 128),
    ]


@pytest.mark.parametrize(("stem", "level1_in"), [(0, 32), (8, 32 + 8)])
def test_swin_depthnet_reaches_full_resolution_from_stride_4(stem, level1_in):
    torch.manual_seed(0)
    net = build_depthnet("tiny-cpu", stem_channels=stem).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net.features(net.encoder_input(x))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (16, 16, 16),
        (32, 8, 8),
        (64, 4, 4),
        (128, 2, 2),
    ]
    assert _level_shapes(net, x) == [
        (2, 256, 4, 4),
        (2, 128, 8, 8),
        (2, 64, 16, 16),
        (2, 32, 32, 32),
        (2, 16, 64, 64),
    ]
    # Spec 9.3: stride 16 -> level 4, 8 -> 3, 4 -> 2; level 1 has only the optional stem.
    assert [b.conv.conv.in_channels for b in net.decoder.upconvs1] == [
        256 + 64,
        128 + 32,
        64 + 16,
        level1_in,
        16,
    ]
    assert net.decoder.upconvs0[0].conv.conv.in_channels == 128


def test_multiscale_heads_give_levels_0_to_3_and_level_0_is_the_output():
    torch.manual_seed(0)
    dec = DispNetDecoder((8, 8, 16, 16), TINY_DEC).eval()
    feats = _features((8, 8, 16, 16))
    with torch.no_grad():
        disps = dec.forward_multiscale(feats)
        out = dec(feats)
    assert [tuple(d.shape[-2:]) for d in disps] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert torch.equal(disps[0], out)
    assert len(DispNetDecoder((8, 8, 16, 16), TINY_DEC, coarse_heads=False).dispconvs) == 1


@pytest.mark.parametrize("skip_norm", [True, False])
def test_skip_norm_makes_the_decoder_blind_to_skip_scale_and_offset(skip_norm):
    torch.manual_seed(0)
    dec = DispNetDecoder((8, 8, 16, 16), TINY_DEC, skip_norm=skip_norm).eval()
    feats = _features((8, 8, 16, 16))
    # A per-pixel positive scale and offset of every skip map (not the deepest one).
    moved = [3.0 * f * (1.5 + f[:, :1].abs()) + 2.0 for f in feats[:-1]] + [feats[-1]]
    with torch.no_grad():
        a, b = dec(feats), dec(moved)
    if skip_norm:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        assert (a - b).abs().max().item() > 1e-3


def test_reflect_padding_hides_the_border_and_zero_padding_shows_it():
    """Uniform features give a uniform map through the reference's reflection padding (the
    decoder cannot tell where it is in the image); zero padding makes the border visible. Both
    have the same parameters: a state dict moves between them unchanged."""
    torch.manual_seed(0)
    ref = DispNetDecoder((8, 8, 16, 16), TINY_DEC, stem_channels=4).eval()
    zeros = DispNetDecoder((8, 8, 16, 16), TINY_DEC, stem_channels=4, padding="zeros").eval()
    zeros.load_state_dict(ref.state_dict())
    assert zeros.config == {**ref.config, "padding": "zeros"}
    assert DispNetDecoder(**zeros.config).padding == "zeros"
    feats = [
        torch.full((1, c, 64 // s, 64 // s), 0.7)
        for c, s in zip((8, 8, 16, 16), (4, 8, 16, 32), strict=True)
    ]
    image = torch.full((1, 3, 64, 64), 0.3)
    with torch.no_grad():
        a, b = ref(feats, image), zeros(feats, image)
    assert (a.max() - a.min()).item() < 1e-5
    assert (b.max() - b.min()).item() > 1e-3
    with pytest.raises(ConfigError, match="padding"):
        DispNetDecoder((8, 8, 16, 16), TINY_DEC, padding="replicate")
    net = build_depthnet("tiny-cpu", padding="zeros")
    assert net.config["decoder"]["padding"] == "zeros"


@pytest.mark.parametrize(
    ("mode", "scale", "shift"),
    [
        ("reference", [1.0] * 3, [0.0] * 3),
        ("unit", [0.225] * 3, [0.45] * 3),
        (
            "imagenet",
            [0.225 / s for s in IMAGENET_STD],
            [(0.45 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)],
        ),
    ],
)
def test_input_normalisation_converts_the_reference_image(mode, scale, shift):
    torch.manual_seed(0)
    net = build_depthnet("tiny-cpu", input_norm=mode, num_ch_dec=TINY_DEC).eval()
    seen = []
    hook = net.encoder.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        net(x)
    hook.remove()
    expected = x * torch.tensor(scale).view(1, 3, 1, 1) + torch.tensor(shift).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], expected)
    assert net.config["input_norm"] == mode


def test_auto_input_norm_is_imagenet_for_swin_and_reference_for_resnet():
    assert build_depthnet("tiny-cpu", num_ch_dec=TINY_DEC).input_norm == "imagenet"
    assert build_depthnet("resnet18", num_ch_dec=TINY_DEC).input_norm == "reference"
    assert build_depthnet("tiny-cpu", num_ch_dec=TINY_DEC).decoder.skip_norms is not None
    assert build_depthnet("resnet18", num_ch_dec=TINY_DEC).decoder.skip_norms is None


def test_resnet_encoder_equals_the_torchvision_network_of_the_reference():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    ref.eval()
    net = build_depthnet("resnet18").eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    net.encoder.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f0 = ref.relu(ref.bn1(ref.conv1(x)))
        f1 = ref.layer1(ref.maxpool(f0))
        f2 = ref.layer2(f1)
        f3 = ref.layer3(f2)
        f4 = ref.layer4(f3)
        ours = net.features(x)
    for a, b in zip(ours, (f0, f1, f2, f3, f4), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_configs_raise_clear_errors():
    net = build_depthnet("resnet18", num_ch_dec=TINY_DEC)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="at least 64"):
        net(torch.randn(1, 3, 32, 64))
    with pytest.raises(ConfigError, match="unknown DepthNet encoder 'resnet19'"):
        build_depthnet("resnet19")
    with pytest.raises(ConfigError, match="unknown ResNet encoder argument"):
        build_depthnet("resnet18", img_size=64)
    with pytest.raises(ConfigError, match="stride-2 stem"):
        DispNetDecoder((64, 64, 128, 256, 512), stem_channels=8)
    dec = DispNetDecoder((8, 8, 16, 16), TINY_DEC)
    with pytest.raises(ValueError, match=r"channels \[8, 8, 16, 16\]"):
        dec(_features((8, 8, 16, 32)))
    with pytest.raises(ConfigError, match="cannot be combined"):
        DepthNet(net.encoder, net.decoder, stem_channels=4)
    with pytest.raises(ConfigError, match="input_norm"):
        build_depthnet("tiny-cpu", input_norm="imagenette")


@pytest.mark.learning(seed=0)
def test_decoder_learns_a_depth_map(learning_seed, learning_record):
    # The decoder can fit a target from fixed features: the loss must fall by an order of
    # magnitude. At lr 3e-3 Adam's last steps oscillate (a single step spans 0.01-0.13 x the
    # first loss across seeds 0-2 x threads 1, 2), so the end is the mean of the last 10 steps
    # (0.024-0.037 x measured; a decoder that learns nothing stays near 1).
    torch.manual_seed(learning_seed)
    dec = DispNetDecoder((8, 8, 16, 16), TINY_DEC, skip_norm=True)
    feats = _features((8, 8, 16, 16), seed=learning_seed)
    target = 0.5 + 0.4 * torch.linspace(0, 1, 64).view(1, 1, 64, 1).expand(2, 1, 64, 64)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = F.l1_loss(1.0 / dec(feats), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    end = sum(losses[-10:]) / 10
    learning_record["last step / first loss"] = losses[-1] / losses[0]
    learning_record["mean of last 10 / first loss (< 0.1)"] = end / losses[0]
    assert end < 0.1 * losses[0], (losses[0], losses[-10:])
