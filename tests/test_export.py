"""``mesadepth export``: official -> mesadepth -> official is exact, and back again.

The "official" files are written here from the reference code's rules, independently of the
exporter: the key map of spec 3.2 (patch merging at the end of a stage, ``rpe_mlp`` / ``norm3``
in the depth repository), the reference modules' registration order, and the persistent
window buffers computed with the reference formulas (transcribed below from the spec's
description of microsoft/Swin-Transformer and MIM-Depth-Estimation).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from mesadepth.cli import main
from mesadepth.commands.export import export_official
from mesadepth.errors import ConfigError, DataError
from mesadepth.models.backbone import (
    SwinV2Encoder,
    load_encoder,
    load_official_checkpoint,
    save_encoder,
)
from mesadepth.models.depth_head import (
    DepthModel,
    XieDepthHead,
    load_official_depth_model,
    save_depth_model,
)
from mesadepth.models.simmim import SimMIM, load_simmim_checkpoint

# Two blocks per stage so stages 0 and 1 have shifted blocks (attn_mask); 64 px, window 4:
# token maps 16, 8, 4, 2 -> windows 4, 4, 4, 2, shifts on, on, off, off.
CFG = dict(
    img_size=64,
    embed_dim=16,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 2, 4),
    window_size=4,
    layer_norm_eps=1e-5,
)
GRIDS = (16, 8, 4, 2)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random, well-scaled values for every parameter and BatchNorm statistic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                t.fill_(7)  # num_batches_tracked: an int64 that must survive
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("logit_scale"):
                t.copy_(math.log(10) + 0.2 * noise)
            elif name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif t.dim() >= 2:
                t.copy_(noise / math.sqrt(t[0].numel()))
            else:
                t.copy_(1 + 0.2 * noise if name.endswith("norm1.weight") else 0.2 * noise)
    return model.eval()


# -- the reference rules, written out independently of the exporter ---------------------------


def ref_coords_table(window: int, pretrained: int) -> torch.Tensor:
    """relative_coords_table (1, 2W-1, 2W-1, 2): offsets / (P - 1) * 8, signed log2(1+|.|) / 3."""
    r = torch.arange(-(window - 1), window, dtype=torch.float32)
    t = torch.stack(torch.meshgrid([r, r], indexing="ij")).permute(1, 2, 0).contiguous()
    t = t.unsqueeze(0)
    d = (pretrained if pretrained > 0 else window) - 1
    t[..., 0] /= d
    t[..., 1] /= d
    t *= 8
    return torch.sign(t) * torch.log2(torch.abs(t) + 1.0) / np.log2(8)


def ref_position_index(window: int) -> torch.Tensor:
    c = torch.stack(torch.meshgrid([torch.arange(window)] * 2, indexing="ij")).flatten(1)
    rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def ref_attn_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, grid, grid, 1)
    cnt = 0
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for h in cuts:
        for w in cuts:
            img[:, h, w, :] = cnt
            cnt += 1
    n = grid // window
    win = img.view(1, n, window, n, window, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, window**2)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def reference_encoder(
    timm_state: dict[str, torch.Tensor], depth_repo: bool, pretrained=(0, 0, 0, 0)
) -> dict[str, torch.Tensor]:
    """An encoder state dict as the reference module's state_dict() holds it (spec 3.2).

    Official Swin-v2 / SimMIM: per block attn_mask (shifted blocks), norm1, attn (logit_scale,
    q_bias, v_bias, the two window buffers, cpb_mlp, qkv, proj), norm2, mlp; patch merging at
    the end of stages 0-2; final norm. The depth repository: the same without attn_mask, with
    rpe_mlp and norm3.
    """
    out = {}
    for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias"):
        out["patch_embed." + k] = timm_state["patch_embed." + k]
    for s, depth in enumerate(CFG["depths"]):
        win = min(CFG["window_size"], GRIDS[s])
        shifting = GRIDS[s] > win
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            if not depth_repo and shifting and b % 2 == 1:
                out[p + "attn_mask"] = ref_attn_mask(GRIDS[s], win, win // 2)
            mlp = "rpe_mlp" if depth_repo else "cpb_mlp"
            names = ["norm1.weight", "norm1.bias", "attn.logit_scale", "attn.q_bias", "attn.v_bias"]
            for n in names:
                out[p + n] = timm_state[p + n]
            out[p + "attn.relative_coords_table"] = ref_coords_table(win, pretrained[s])
            out[p + "attn.relative_position_index"] = ref_position_index(win)
            for n in ("0.weight", "0.bias", "2.weight"):
                out[p + f"attn.{mlp}.{n}"] = timm_state[p + f"attn.cpb_mlp.{n}"]
            for n in (
                "attn.qkv.weight",
                "attn.proj.weight",
                "attn.proj.bias",
                "norm2.weight",
                "norm2.bias",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
            ):
                out[p + n] = timm_state[p + n]
        if s + 1 < len(CFG["depths"]):
            for n in ("reduction.weight", "norm.weight", "norm.bias"):
                out[f"layers.{s}.downsample.{n}"] = timm_state[f"layers.{s + 1}.downsample.{n}"]
    final = "norm3" if depth_repo else "norm"
    out[final + ".weight"], out[final + ".bias"] = (
        timm_state["norm.weight"],
        timm_state["norm.bias"],
    )
    return {k: v.clone() for k, v in out.items()}


def glpdepth_head(head_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GLPDepth's head names: Decoder (deconv_layers, conv_layers) and top-level last_layer_depth."""
    return {
        (k if k.startswith("last_layer_depth.") else "decoder." + k): v.clone()
        for k, v in head_state.items()
    }


def assert_same(a: dict, b: dict) -> None:
    """Same keys in the same order, same dtypes, identical values."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def source_encoder(seed: int, **kw) -> SwinV2Encoder:
    torch.manual_seed(seed)
    return randomize(SwinV2Encoder(**{**CFG, **kw}), seed)


# -- official -> mesadepth -> official -----------------------------------------------------------


def test_swinv2_round_trip_is_exact(tmp_path) -> None:
    src = source_encoder(0).state_dict()
    official = {"model": reference_encoder({k: v for k, v in src.items()}, depth_repo=False)}
    assert "layers.0.blocks.1.attn_mask" in official["model"]  # the shifted blocks are covered
    path = tmp_path / "swinv2.pth"
    torch.save(official, path)

    enc = SwinV2Encoder(**CFG)
    report = load_official_checkpoint(path, enc)
    assert report.original_layout and report.reinitialised == ["mask_token"]
    save_encoder(enc, tmp_path / "model.safetensors")
    rep = export_official(tmp_path / "model.safetensors", tmp_path / "out.pth", "swinv2")
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(back) == ["model"]
    assert_same(back["model"], official["model"])
    assert rep.container == "model" and rep.left_out == ["encoder.mask_token"]
    assert rep.reference["MODEL.SWINV2.WINDOW_SIZE"] == 4 and rep.tensors == len(official["model"])
    # Swin-Transformer's supervised loader reads head.bias: a zero head after the final norm.
    export_official(
        tmp_path / "model.safetensors", tmp_path / "cls.pth", "swinv2", classifier_head=10
    )
    cls = torch.load(tmp_path / "cls.pth", weights_only=True)["model"]
    assert list(cls)[-3:] == ["norm.bias", "head.weight", "head.bias"]
    assert cls["head.weight"].shape == (10, 128) and not cls["head.weight"].any()
    assert_same({k: cls[k] for k in official["model"]}, official["model"])


def test_simmim_round_trip_is_exact_and_the_decoder_travels(tmp_path) -> None:
    src = source_encoder(1)
    sim = SimMIM(src, encoder_stride=32)
    randomize(sim.decoder, 2)
    enc_sd = reference_encoder(src.state_dict(), depth_repo=False)
    official = {"encoder.mask_token": src.mask_token.detach().clone()}
    official.update({"encoder." + k: v for k, v in enc_sd.items()})
    official.update({"decoder." + k: v.clone() for k, v in sim.decoder.state_dict().items()})
    path = tmp_path / "simmim.pth"
    torch.save({"model": official, "epoch": 799}, path)

    fresh = SimMIM(SwinV2Encoder(**CFG), encoder_stride=32)
    report = load_simmim_checkpoint(path, fresh)
    assert report.decoder == "loaded" and report.reinitialised == [] and report.dropped == []
    decoder = {f"decoder.{k}": v for k, v in fresh.decoder.state_dict().items()}
    save_encoder(fresh.encoder, tmp_path / "model.safetensors", extra=decoder)  # as run_masked
    rep = export_official(tmp_path / "model.safetensors", tmp_path / "out.pth", "simmim")
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(back) == ["model"]
    assert_same(back["model"], official)
    assert rep.parts == ["encoder", "mask_token", "simmim decoder"] and rep.left_out == []


def test_mim_depth_round_trip_is_exact(tmp_path) -> None:
    pretrained = (3, 3, 3, 2)  # the depth repository normalises offsets by these (spec 2.7)
    enc = source_encoder(3, pretrained_window_sizes=pretrained)
    head = randomize(XieDepthHead(128, 16, num_filters=(8, 8, 8)), 4)
    official = {
        **{
            "encoder." + k: v
            for k, v in reference_encoder(enc.state_dict(), True, pretrained).items()
        },
        **glpdepth_head(head.state_dict()),
    }
    path = tmp_path / "nyu.ckpt"
    torch.save(official, path)  # test.py's form: a bare state dict

    model = load_official_depth_model(
        path, encoder={**CFG, "pretrained_window_sizes": pretrained}, max_depth=10.0
    )
    save_depth_model(model, tmp_path / "model.safetensors")
    rep = export_official(tmp_path / "model.safetensors", tmp_path / "out.pth", "mim-depth")
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert_same(back, official)
    assert rep.container == "flat" and rep.parts == ["encoder", "depth head"]
    assert rep.reference["--window_size"] == [4, 4, 4, 2]
    assert rep.reference["--pretrain_window_size"] == list(pretrained)
    assert rep.reference["--use_shift"] == [True, True, False, False]
    assert rep.reference["--num_filters"] == [8, 8, 8]

    # The same tensors as safetensors, flat, with the layout in the metadata.
    export_official(tmp_path / "model.safetensors", tmp_path / "out.safetensors", "mim-depth")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata()["mesadepth.export_layout"] == "mim-depth"
        flat = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: flat[k] for k in back} == flat
    assert all(torch.equal(flat[k], back[k]) for k in back)


# -- mesadepth -> official -> mesadepth ----------------------------------------------------------


def test_exported_depth_model_imports_back_with_identical_outputs(tmp_path) -> None:
    enc = source_encoder(5, pretrained_window_sizes=(3, 3, 3, 2), layer_norm_eps=1e-6)
    model = DepthModel(enc, randomize(XieDepthHead(128, 16, num_filters=(8, 8, 8)), 6)).eval()
    save_depth_model(model, tmp_path / "model.safetensors")
    rep = export_official(tmp_path / "model.safetensors", tmp_path / "glp.pth", "mim-depth")
    assert not any("eps" in n for n in rep.notes)  # 1e-6 is the depth repository's eps
    back = load_official_depth_model(
        tmp_path / "glp.pth",
        encoder={**CFG, "pretrained_window_sizes": (3, 3, 3, 2), "layer_norm_eps": 1e-6},
    ).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("layout", ["swinv2", "simmim", "mim-depth"])
def test_exported_encoder_imports_back_with_identical_features(tmp_path, layout) -> None:
    enc = source_encoder(7)
    save_encoder(enc, tmp_path / "model.safetensors", metadata={"stage": "geometric"})
    export_official(tmp_path / "model.safetensors", tmp_path / "out.pth", layout)
    dst = SwinV2Encoder(**CFG).eval()
    report = load_official_checkpoint(tmp_path / "out.pth", dst)
    assert report.mask_token_loaded == (layout == "simmim")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dst.forward_features_masked(x), enc.forward_features_masked(x))


def test_the_paper_geometry_gives_the_reference_settings_and_tables(tmp_path) -> None:
    """480 px, windows (30, 30, 30, 15), pretrained (12, 12, 12, 6): the README's command line."""
    cfg = dict(CFG, img_size=480, window_size=(30, 30, 30, 15), layer_norm_eps=1e-6)
    enc = SwinV2Encoder(**cfg, pretrained_window_sizes=(12, 12, 12, 6))
    save_encoder(enc, tmp_path / "mp.safetensors")
    rep = export_official(
        tmp_path / "mp.safetensors", tmp_path / "mp.pth", "mim-depth", buffers=True
    )
    assert rep.reference["--window_size"] == [30, 30, 30, 15]
    assert rep.reference["--pretrain_window_size"] == [12, 12, 12, 6]
    assert rep.reference["--use_shift"] == [True, True, False, False]
    sd = torch.load(tmp_path / "mp.pth", weights_only=True)
    assert torch.equal(
        sd["encoder.layers.0.blocks.0.attn.relative_coords_table"], ref_coords_table(30, 12)
    )
    assert torch.equal(
        sd["encoder.layers.3.blocks.1.attn.relative_coords_table"], ref_coords_table(15, 6)
    )
    assert "encoder.norm3.weight" in sd and not any("attn_mask" in k for k in sd)
    off = export_official(tmp_path / "mp.safetensors", tmp_path / "off.pth", "swinv2")
    assert off.reference["MODEL.SWINV2.WINDOW_SIZE"] == 30
    assert off.reference["MODEL.SWINV2.PRETRAINED_WINDOW_SIZES"] == [12, 12, 12, 6]
    sd = torch.load(tmp_path / "off.pth", weights_only=True)["model"]
    assert torch.equal(sd["layers.1.blocks.1.attn_mask"], ref_attn_mask(60, 30, 15))


# -- command line and errors ---------------------------------------------------------------------


def test_cli_prints_the_reference_settings_and_refuses_bad_requests(tmp_path, capsys) -> None:
    enc = source_encoder(8)
    src = tmp_path / "model.safetensors"
    save_encoder(enc, src, extra={"pose_net.w": torch.zeros(2)})
    out = tmp_path / "mp.pth"
    assert main(["export", str(src), str(out), "--layout", "mim-depth", "--no-buffers"]) == 0
    text = capsys.readouterr().out
    assert "--window_size 4 4 4 2" in text and "--use_shift True True False False" in text
    assert "left out: encoder.mask_token, pose_net.* (1)" in text
    sd = torch.load(out, weights_only=True)
    assert not any(re.search("relative_|attn_mask", k) for k in sd)
    # An existing output needs --overwrite; a .pth source is refused; bad suffixes too.
    assert main(["export", str(src), str(out), "--layout", "mim-depth"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(out), str(tmp_path / "x.pth"), "--layout", "swinv2"]) == 2
    assert "expected this project's .safetensors" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="suffix"):
        export_official(src, tmp_path / "x.txt", "swinv2")
    with pytest.raises(ConfigError, match="flat"):
        export_official(src, tmp_path / "x.safetensors", "swinv2", container="model")
    with pytest.raises(DataError, match="missing mesadepth weights"):
        export_official(tmp_path / "absent.safetensors", tmp_path / "y.pth", "swinv2")
    # simmim from an encoder-only file says the decoder is not there.
    rep = export_official(src, tmp_path / "s.pth", "simmim")
    assert any("no SimMIM decoder" in n for n in rep.notes)
    assert load_encoder(src).config == enc.config
