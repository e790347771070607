"""PoseNet and the ARN (geometric spec 2.1, 2.3, 2.4): 6-channel ImageNet init, scaling, input size."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mesadepth.errors import DataError, MissingFileError
from mesadepth.models.dispnet import build_depthnet
from mesadepth.models.posenet import PoseNet, adapt_first_conv
from mesadepth.models.rectify import RectifyNet


def _imagenet_like(num_layers: int = 18) -> torch.nn.Module:
    """A 3-channel ResNet with a classifier and non-trivial BN statistics, as ImageNet files hold."""
    torch.manual_seed(num_layers)
    net = timm.create_model(f"resnet{num_layers}", pretrained=False, num_classes=1000)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    net = _imagenet_like()
    path = tmp_path_factory.mktemp("imagenet") / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)  # torchvision's format: a bare state dict with fc.*
    return net, path


@pytest.mark.parametrize("cls", [PoseNet, RectifyNet])
def test_six_channel_conv1_is_the_imagenet_kernel_twice_halved(cls, imagenet_file):
    ref, path = imagenet_file
    net = cls(pretrained=path)
    w = ref.conv1.weight
    expected = torch.cat([w, w], dim=1) / 2
    assert net.encoder.conv1.weight.shape == (64, 6, 7, 7)
    assert torch.equal(net.encoder.conv1.weight, expected)
    # Every other parameter and BN buffer is overwritten by the file (spec 2.1), fc is dropped.
    ours = net.encoder.state_dict()
    for key, value in ref.state_dict().items():
        if key.startswith("fc."):
            assert key not in ours
        elif key != "conv1.weight":
            assert torch.equal(ours[key], value), key


def test_two_identical_images_give_the_imagenet_response_to_one(imagenet_file):
    ref, path = imagenet_file
    net = PoseNet(pretrained=path).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = net.encoder.forward_features(torch.cat([img, img], dim=1))
        theirs = ref.forward_features(img)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_safetensors_imagenet_file_and_depth_encoder_load(tmp_path, imagenet_file):
    ref, _ = imagenet_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    assert torch.equal(
        PoseNet(pretrained=path).encoder.conv1.weight, adapt_first_conv(ref.conv1.weight, 6)
    )
    depth = build_depthnet("resnet18", pretrained=path)
    # The 3-channel depth encoder takes the kernel unchanged.
    assert torch.equal(depth.encoder.conv1.weight, ref.conv1.weight)
    assert torch.equal(depth.encoder.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)


def test_missing_or_wrong_imagenet_file_errors_name_file_and_fix(tmp_path):
    missing = tmp_path / "resnet18-f37072fd.pth"
    with pytest.raises(MissingFileError) as err:
        PoseNet(pretrained=missing)
    msg = str(err.value)
    assert str(missing) in msg and "download" in msg and "resnet18-f37072fd.pth" in msg
    wrong = tmp_path / "resnet34.pth"
    torch.save(_imagenet_like(34).state_dict(), wrong)
    with pytest.raises(
        DataError, match=r"resnet34\.pth: weights do not match .*unexpected key\(s\): layer1\.2"
    ):
        PoseNet(pretrained=wrong)


@pytest.mark.parametrize(("cls", "scale", "n"), [(PoseNet, 0.01, 6), (RectifyNet, 1.0, 3)])
def test_output_is_scaled_global_mean_of_the_last_conv(cls, scale, n):
    torch.manual_seed(0)
    net = cls().eval()
    seen = []
    hook = net.decoder.convs_pose[2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    a, b = torch.randn(2, 3, 64, 96), torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = net(a, b)
    hook.remove()
    assert out.shape == (2, n)
    torch.testing.assert_close(out, scale * seen[0].mean(dim=(2, 3)))
    # A constant last layer pins the scaling exactly: weight 0, bias b -> scale * b for any input.
    bias = torch.arange(1.0, n + 1)
    with torch.no_grad():
        net.decoder.convs_pose[2].weight.zero_()
        net.decoder.convs_pose[2].bias.copy_(bias)
        out = net(a, b)
    torch.testing.assert_close(out, (scale * bias).expand(2, n))


def test_posenet_decoder_structure_matches_spec():
    net = PoseNet()
    shapes = {k: tuple(v.shape) for k, v in net.decoder.state_dict().items()}
    assert shapes == {
        "conv_squeeze.weight": (256, 512, 1, 1),
        "conv_squeeze.bias": (256,),
        "convs_pose.0.weight": (256, 256, 3, 3),
        "convs_pose.0.bias": (256,),
        "convs_pose.1.weight": (256, 256, 3, 3),
        "convs_pose.1.bias": (256,),
        "convs_pose.2.weight": (6, 256, 1, 1),
        "convs_pose.2.bias": (6,),
    }
    # Random init as torchvision's (the reference's): no zeroed last BN per block (timm's default).
    assert torch.equal(net.encoder.layer1[0].bn2.weight, torch.ones(64))


@pytest.mark.parametrize(("cls", "scale"), [(PoseNet, 0.01), (RectifyNet, 1.0)])
def test_zero_mean_changes_of_the_last_map_do_not_move_the_output(cls, scale):
    torch.manual_seed(0)
    net = cls().eval()
    # 128 px: the ARN's f4 map is 2x2 (64 px would leave it 1x1, where no pattern has zero mean).
    x, y = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        base = net(x, y)
    last = net.decoder.convs_pose[2]

    def run(delta):
        hook = last.register_forward_hook(lambda _m, _i, out: out + delta(out))
        with torch.no_grad():
            out = net(x, y)
        hook.remove()
        return out

    def checker(out):  # +-5 in a checkerboard: zero spatial mean (even map size)
        i = torch.arange(out.shape[-2]).view(-1, 1)
        j = torch.arange(out.shape[-1]).view(1, -1)
        return 5.0 * (1 - 2 * ((i + j) % 2)).to(out.dtype)

    torch.testing.assert_close(run(checker), base, rtol=1e-5, atol=1e-6)
    shifted = run(lambda out: torch.full_like(out, 2.0))
    torch.testing.assert_close(
        shifted - base, torch.full_like(base, 2.0 * scale), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(("h", "w"), [(64, 64), (65, 97)])
def test_arn_sees_the_pair_halved_with_align_corners_true(h, w):
    torch.manual_seed(0)
    arn = RectifyNet().eval()
    seen = []
    hook = arn.encoder.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    a, b = torch.randn(1, 3, h, w), torch.randn(1, 3, h, w)
    with torch.no_grad():
        arn(a, b)
    hook.remove()
    pair = torch.cat([a, b], dim=1)
    assert seen[0].shape == (1, 6, h // 2, w // 2)
    torch.testing.assert_close(
        seen[0], F.interpolate(pair, (h // 2, w // 2), mode="bilinear", align_corners=True)
    )
    other = F.interpolate(pair, (h // 2, w // 2), mode="bilinear", align_corners=False)
    assert (seen[0] - other).abs().max().item() > 1e-2


def test_posenet_sees_the_full_resolution_pair():
    net = PoseNet().eval()
    seen = []
    hook = net.encoder.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    a, b = torch.randn(1, 3, 64, 96), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        net(a, b)
    hook.remove()
    assert torch.equal(seen[0], torch.cat([a, b], dim=1))
    with pytest.raises(ValueError, match="equal shape"):
        net(a, b[..., :64])
