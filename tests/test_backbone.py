"""Swin-v2 encoder: mask token, pyramid, windows, layer taps, weights files, official import."""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from mesadepth.errors import ConfigError, DataError, MissingFileError
from mesadepth.models.backbone import (
    PAPER_LAYERS,
    REFERENCE_LAYERS,
    REFERENCE_TO_TIMM,
    SWINV2_PRESETS,
    SwinV2Encoder,
    build_encoder,
    load_encoder,
    load_official_checkpoint,
    load_tensors,
    paper_layers,
    read_metadata,
    resolve_layer,
    resolve_layers,
    save_encoder,
    tap,
)

TINY = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random, well-scaled value.

    timm zero-initialises the res-post-norm weights, which makes every block an identity and
    would hide position-bias or layout bugs; random weights make each parameter matter.
    """
    g = torch.Generator().manual_seed(seed)
    norm_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) and m.weight is not None
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.2 * noise)
            elif id(p) in norm_weights:
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def tiny(seed: int = 0, **kw) -> SwinV2Encoder:
    torch.manual_seed(seed)
    return randomize(SwinV2Encoder(**{**TINY, **kw}), seed)


def image(b: int = 2, h: int = 64, w: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def random_mask(b: int, ht: int, wt: int, seed: int = 2) -> torch.Tensor:
    return (torch.rand(b, ht, wt, generator=torch.Generator().manual_seed(seed)) < 0.6).long()


# -- construction and shapes ------------------------------------------------------------------


def test_tiny_preset_is_small_and_pyramid_has_the_four_strides() -> None:
    enc = build_encoder("tiny-cpu").eval()
    assert sum(p.numel() for p in enc.parameters()) < 400_000
    assert enc.mask_token.shape == (1, 1, 16)
    feats = enc.forward_pyramid(image())
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 16, 16),
        (2, 32, 8, 8),
        (2, 64, 4, 4),
        (2, 128, 2, 2),
    ]
    assert enc.stage_channels == [16, 32, 64, 128]
    out = enc.forward_features_masked(image())
    assert out.shape == (2, 128, 2, 2)
    # The stride-32 pyramid level is the normed final feature.
    torch.testing.assert_close(feats[-1], out, rtol=0, atol=0)


def test_non_square_input_and_per_stage_windows() -> None:
    enc = tiny(img_size=(96, 128), window_size=(4, 4, 4, 2))
    assert enc.grid_size == (24, 32)
    x = image(1, 96, 128)
    feats = enc.forward_pyramid(x, mask=random_mask(1, 24, 32))
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    windows = [stage.blocks[0].window_size for stage in enc.layers]
    assert windows == [(4, 4), (4, 4), (4, 4), (2, 2)]
    assert enc.config["img_size"] == [96, 128]
    assert enc.config["window_size"] == [4, 4, 4, 2]


def test_large_presets_match_the_spec_geometry() -> None:
    cfg = SWINV2_PRESETS["swinv2_large_window12_192"]
    assert (cfg["embed_dim"], tuple(cfg["depths"]), tuple(cfg["num_heads"])) == (
        192,
        (2, 2, 18, 2),
        (6, 12, 24, 48),
    )
    ft = SWINV2_PRESETS["swinv2_large_window30_480"]
    assert tuple(ft["window_size"]) == (30, 30, 30, 15)
    assert tuple(ft["pretrained_window_sizes"]) == (12, 12, 12, 6)
    assert ft["drop_path_rate"] == 0.5


def test_layer_norm_eps_defaults_to_reference_value_and_is_configurable() -> None:
    enc = build_encoder("tiny-cpu")
    eps = {m.eps for m in enc.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-6}
    enc5 = build_encoder("tiny-cpu", layer_norm_eps=1e-5)
    assert {m.eps for m in enc5.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


@pytest.mark.parametrize(
    ("preset", "eps"),
    [
        ("tiny-cpu", 1e-6),
        ("swinv2_base_window12_192", 1e-5),  # SimMIM / official Swin-v2 (spec pitfall 16)
        ("swinv2_large_window12_192", 1e-5),
        ("swinv2_large_window30_480", 1e-6),  # the depth repository's encoder (spec 2.1)
        ("swinv2_base_window30_480", 1e-6),
    ],
)
def test_every_norm_layer_of_each_preset_has_the_reference_eps(preset: str, eps: float) -> None:
    assert set(SWINV2_PRESETS) == {
        "tiny-cpu",
        "swinv2_base_window12_192",
        "swinv2_large_window12_192",
        "swinv2_large_window30_480",
        "swinv2_base_window30_480",
    }  # a new preset needs a row above
    with torch.device("meta"):  # architecture only: no memory, no initialisation cost
        enc = build_encoder(preset)
    norms = [m for m in enc.modules() if hasattr(m, "eps")]
    # Every norm: patch embedding, norm1 + norm2 per block, 3 patch mergings, the output norm.
    depths = SWINV2_PRESETS[preset]["depths"]
    assert len(norms) == 1 + 2 * sum(depths) + 3 + 1
    assert all(isinstance(m, nn.LayerNorm) for m in norms)
    assert {m.eps for m in norms} == {eps}
    assert enc.config["layer_norm_eps"] == eps  # saved files reopen with it
    if preset.endswith("_window12_192"):
        # Named after timm's model, whose norms (nn.LayerNorm defaults) the official SimMIM
        # checkpoints were trained with.
        with torch.device("meta"):
            ref = timm.create_model(preset, pretrained=False, num_classes=0)
        assert [m.eps for m in ref.modules() if hasattr(m, "eps")] == [m.eps for m in norms]
    # An explicit eps still wins over the preset.
    with torch.device("meta"):
        other = build_encoder(preset, layer_norm_eps=1e-3)
    assert {m.eps for m in other.modules() if hasattr(m, "eps")} == {1e-3}


def test_build_encoder_rejects_unknown_names_with_close_matches() -> None:
    with pytest.raises(ConfigError, match="tiny-cpu"):
        build_encoder("tiny_cpu")
    with pytest.raises(ConfigError, match="window_size"):
        build_encoder("tiny-cpu", window_sise=8)
    with pytest.raises(ConfigError, match="num_heads"):
        build_encoder({"preset": "tiny-cpu", "num_heads": (3, 3, 3, 3)})
    enc = build_encoder({"preset": "tiny-cpu", "img_size": 32}, drop_path_rate=0.2)
    assert enc.config["img_size"] == [32, 32] and enc.config["drop_path_rate"] == 0.2


# -- mask token (spec 1.2) ---------------------------------------------------------------------


def test_mask_replaces_masked_tokens_only() -> None:
    enc = tiny()
    x = image()
    mask = random_mask(2, 16, 16)
    plain = enc.patch_embed(x)
    mixed = enc.embed(x, mask)
    keep = mask == 0
    assert keep.any() and (~keep).any()
    assert torch.equal(mixed[keep], plain[keep])
    assert torch.equal(mixed[~keep], enc.mask_token[0, 0].expand(int((~keep).sum()), -1))
    with pytest.raises(ValueError, match="16, 16"):
        enc.embed(x, mask[:, :8])


def test_mask_token_gradient_flows_only_through_masked_tokens() -> None:
    enc = tiny()
    x = image()
    enc.forward_features_masked(x, random_mask(2, 16, 16)).square().sum().backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().sum() > 0
    enc.zero_grad(set_to_none=True)
    enc.forward_features_masked(x, torch.zeros(2, 16, 16)).square().sum().backward()
    assert torch.count_nonzero(enc.mask_token.grad) == 0


def test_zero_mask_equals_the_plain_timm_forward() -> None:
    enc = tiny()
    plain = SwinTransformerV2(
        img_size=64,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    state = {k: v for k, v in enc.state_dict().items() if k != "mask_token"}
    plain.load_state_dict(state, strict=True)
    x = image()
    ref = plain.forward_features(x).permute(0, 3, 1, 2)
    assert torch.equal(enc.forward_features_masked(x, torch.zeros(2, 16, 16)), ref)
    assert torch.equal(enc.forward_features_masked(x), ref)
    # A real mask changes the output, so the comparison above is not vacuous.
    assert not torch.allclose(enc.forward_features_masked(x, random_mask(2, 16, 16)), ref)


# -- pretrained window sizes (spec 2.7, pitfall 10) --------------------------------------------


def test_pretrained_window_size_changes_position_bias_when_window_differs() -> None:
    # 64 px: token maps 16, 8, 4, 2; window 8 is clipped to 8, 8, 4, 2.
    base = tiny(window_size=8)
    x = image()

    def same_weights(pretrained):
        enc = SwinV2Encoder(**{**TINY, "window_size": 8, "pretrained_window_sizes": pretrained})
        enc.load_state_dict(base.state_dict(), strict=True)
        return enc.eval()

    wrong = same_weights((4, 4, 4, 2))  # weights "pre-trained" at window 4, fine-tuned at 8
    same = same_weights((8, 8, 4, 2))  # pretrained == effective window: the default rule
    table = lambda e: e.layers[0].blocks[0].attn.relative_coords_table  # noqa: E731
    assert not torch.equal(table(wrong), table(base))
    assert torch.equal(table(same), table(base))
    # Spec 2.1: d' = 8 d / (P - 1), then log2(1 + |d'|) / log2(8); the extreme offset d = 7.
    log8 = lambda p: math.log2(1 + 8 * 7 / (p - 1)) / 3  # noqa: E731
    torch.testing.assert_close(table(base).abs().max().item(), log8(8))
    torch.testing.assert_close(table(wrong).abs().max().item(), log8(4))
    out = base.forward_features_masked(x)
    assert torch.equal(same.forward_features_masked(x), out)
    assert (wrong.forward_features_masked(x) - out).abs().max() > 1e-3


# -- layer taps (spec 3.1) ---------------------------------------------------------------------


def test_nine_paper_layers_have_spec_shapes_on_a_slim_depth_18_model() -> None:
    torch.manual_seed(0)
    enc = randomize(
        SwinV2Encoder(
            img_size=192, embed_dim=8, depths=(2, 2, 18, 2), num_heads=(1, 1, 1, 1), window_size=12
        )
    )
    assert paper_layers(enc) == list(PAPER_LAYERS)
    assert [b.window_size for b in (enc.layers[2].blocks[0], enc.layers[3].blocks[0])] == [
        (12, 12),
        (6, 6),
    ]
    c = 8
    expected = [
        (1, 24, 24, 2 * c),
        (1, 12, 12, 4 * c),
        *[(1, 12, 12, 4 * c)] * 5,
        (1, 6, 6, 8 * c),
        (1, 6, 6, 8 * c),
    ]
    x = image(1, 192, 192)
    with torch.no_grad(), tap(enc, PAPER_LAYERS) as feats:
        out = enc.forward_features_masked(x)
    assert list(feats) == list(PAPER_LAYERS)
    assert [tuple(feats[n].shape) for n in PAPER_LAYERS] == expected
    assert torch.equal(feats["norm"].permute(0, 3, 1, 2), out)
    # Distinct blocks give distinct taps (a hook on the wrong module would repeat one).
    assert not torch.equal(feats["layers.2.blocks.3.norm1"], feats["layers.2.blocks.6.norm1"])
    assert all(not m._forward_hooks for m in enc.modules())


def test_hooks_are_removed_even_when_the_forward_fails() -> None:
    enc = tiny()
    with pytest.raises(RuntimeError, match="boom"), tap(enc, [0, "norm"]):
        assert enc.norm._forward_hooks
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in enc.modules())


def test_reference_names_resolve_to_timm_names() -> None:
    assert REFERENCE_TO_TIMM["layers.0.downsample.norm"] == "layers.1.downsample.norm"
    assert REFERENCE_TO_TIMM["norm3"] == "norm"
    assert resolve_layers(REFERENCE_LAYERS) == list(PAPER_LAYERS)
    assert resolve_layers(PAPER_LAYERS) == list(PAPER_LAYERS)
    assert resolve_layer("norm3") == "norm"
    assert resolve_layer(7) == "layers.3.downsample.norm"
    # Ambiguous on its own: timm reading by default, the reference reading on request.
    assert resolve_layer("layers.1.downsample.norm") == "layers.1.downsample.norm"
    assert resolve_layer("layers.1.downsample.norm", naming="reference") == (
        "layers.2.downsample.norm"
    )


def test_unknown_layer_names_list_close_modules() -> None:
    enc = tiny()
    with pytest.raises(ConfigError, match=r"layers\.2\.blocks\.1\.norm1"):
        resolve_layer("layers.2.blocks.1.norm", enc)
    with pytest.raises(ConfigError, match="naming='reference'"):
        resolve_layer("layers.0.downsample.norm", enc, naming="timm")
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layer(6, enc)  # the tiny encoder has six paper layers


@pytest.mark.parametrize(
    ("depth", "blocks"),
    [(18, [3, 6, 9, 12, 15]), (6, [1, 2, 3, 4, 5]), (2, [0, 1]), (1, [0]), (4, [1, 2, 3])],
)
def test_paper_layers_scale_with_stage_2_depth(depth: int, blocks: list[int]) -> None:
    enc = SwinV2Encoder(
        img_size=32, embed_dim=4, depths=(1, 1, depth, 1), num_heads=(1, 1, 1, 1), window_size=2
    )
    names = paper_layers(enc)
    assert [int(re.findall(r"\d+", n)[1]) for n in names if "blocks" in n] == blocks
    assert names[:2] + names[-2:] == [*PAPER_LAYERS[:2], *PAPER_LAYERS[-2:]]
    resolve_layers(names, enc)  # all exist


# -- this project's weights files --------------------------------------------------------------


def test_save_load_round_trip_rebuilds_the_architecture(tmp_path) -> None:
    enc = tiny(img_size=(64, 96), pretrained_window_sizes=(3, 3, 3, 2), layer_norm_eps=1e-5)
    head = torch.randn(12, 128)
    path = save_encoder(
        enc, tmp_path / "model.safetensors", {"decoder.weight": head}, {"stage": "MP", "step": 3}
    )
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    enc_keys = [k for k in keys if k != "decoder.weight"]
    assert len(enc_keys) == len(enc.state_dict()) and all(
        k.startswith("encoder.") for k in enc_keys
    )
    assert "encoder.mask_token" in keys and "encoder.layers.1.downsample.reduction.weight" in keys
    loaded = load_encoder(path).eval()
    assert loaded.config == enc.config
    x = image(2, 64, 96)
    m = random_mask(2, 16, 24)
    assert torch.equal(loaded.forward_features_masked(x, m), enc.forward_features_masked(x, m))
    assert read_metadata(path) == {"stage": "MP", "step": 3}
    assert torch.equal(load_tensors(path, "decoder.")["weight"], head)
    with pytest.raises(ConfigError, match="reserved"):
        save_encoder(enc, tmp_path / "bad.safetensors", {"encoder.extra": head})


def test_load_encoder_into_another_geometry(tmp_path) -> None:
    enc = tiny()
    path = save_encoder(enc, tmp_path / "mp.safetensors")
    ft = load_encoder(
        path, overrides={"img_size": 128, "window_size": 8, "pretrained_window_sizes": (4, 4, 4, 2)}
    )
    assert ft.grid_size == (32, 32)
    assert torch.equal(
        ft.layers[2].blocks[1].attn.qkv.weight, enc.layers[2].blocks[1].attn.qkv.weight
    )
    assert ft.layers[0].blocks[0].attn.pretrained_window_size == (4, 4)


def test_resized_encoder_exports_its_new_geometry(tmp_path) -> None:
    enc = tiny()
    enc.set_input_size(img_size=(128, 96))
    assert enc.config["img_size"] == [128, 96]
    assert enc.config["window_size"] == [[8, 6], [8, 6], [8, 6], [8, 6]]  # scaled with the grid
    loaded = load_encoder(save_encoder(enc, tmp_path / "r.safetensors")).eval()
    x = image(1, 128, 96)
    assert torch.equal(loaded.forward_features_masked(x), enc.forward_features_masked(x))


def test_load_encoder_errors_name_the_file_and_the_keys(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(MissingFileError, match="nope.safetensors"):
        load_encoder(missing)
    path = save_encoder(tiny(), tmp_path / "tiny.safetensors")
    other = SwinV2Encoder(**{**TINY, "depths": (1, 1, 3, 1)})
    with pytest.raises(DataError, match=r"tiny\.safetensors.*missing.*layers\.2\.blocks\.2"):
        load_encoder(path, other)
    # Non-strict loads what matches.
    load_encoder(path, other, strict=False)
    assert torch.equal(other.norm.weight, load_tensors(path, "encoder.")["norm.weight"])

    # A file without a mask token (e.g. from a supervised stage) needs drop_mask_token.
    state = {f"encoder.{k}": v for k, v in tiny().state_dict().items() if k != "mask_token"}
    no_token = tmp_path / "no_token.safetensors"
    save_file(state, str(no_token))
    with pytest.raises(DataError, match="mask_token"):
        load_encoder(no_token, SwinV2Encoder(**TINY))
    with pytest.raises(DataError, match="no encoder config"):
        load_encoder(no_token)
    fresh = SwinV2Encoder(**TINY)
    token = fresh.mask_token.detach().clone()
    load_encoder(no_token, fresh, drop_mask_token=True)
    assert torch.equal(fresh.mask_token, token)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="junk.safetensors.*safetensors"):
        load_encoder(junk)


# -- official checkpoints (spec 3.2, 3.3) ------------------------------------------------------


def to_official(state: dict[str, torch.Tensor], depth_repo: bool = False) -> dict:
    """timm-native encoder keys -> the original SimMIM layout (downsample at end of stage)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
        if depth_repo:
            k = k.replace("cpb_mlp", "rpe_mlp")
            k = re.sub(r"^norm\.", "norm3.", k)
        out["encoder." + k] = v.clone()
    out["encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16).long()
    out["encoder.layers.0.blocks.1.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    out["decoder.weight"] = torch.randn(48, 128, 1, 1)
    return out


VARIANTS = {
    "simmim": lambda sd: {"model": to_official(sd)},
    "dataparallel": lambda sd: {
        "model": {f"module.{k}": v for k, v in to_official(sd).items()},
        "epoch": 5,
    },
    "state_dict": lambda sd: {"state_dict": to_official(sd)},
    "depth_repo": lambda sd: {
        **to_official(sd, depth_repo=True),
        "last_layer_depth.0.weight": torch.zeros(1),
    },
    "own_native_pth": lambda sd: {f"encoder.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_checkpoint_loads_strictly_and_reproduces_features(tmp_path, variant) -> None:
    src = tiny(seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save(VARIANTS[variant](src.state_dict()), path)
    dst = SwinV2Encoder(**TINY).eval()
    report = load_official_checkpoint(path, dst, strict=True)
    assert report.original_layout == (variant != "own_native_pth")
    assert report.mask_token_loaded
    x, m = image(), random_mask(2, 16, 16)
    assert torch.equal(dst.forward_features_masked(x, m), src.forward_features_masked(x, m))
    if variant != "own_native_pth":
        assert "decoder.weight" in report.dropped


def test_supervised_checkpoint_without_prefix_or_token(tmp_path) -> None:
    src = tiny(seed=4)
    sd = {
        k[len("encoder.") :]: v
        for k, v in to_official(src.state_dict()).items()
        if k.startswith("encoder.")
    }
    sd.pop("mask_token")
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 128), torch.zeros(10)
    path = tmp_path / "sup.pth"
    torch.save({"model": sd}, path)
    dst = SwinV2Encoder(**TINY).eval()
    report = load_official_checkpoint(path, dst)
    assert not report.mask_token_loaded and "head.weight" in report.dropped
    x = image()
    assert torch.equal(dst.forward_features_masked(x), src.forward_features_masked(x))


class NotATensor:
    """Stands in for a training-time config object pickled into a checkpoint."""


def test_official_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(MissingFileError, match="absent.pth"):
        load_official_checkpoint(tmp_path / "absent.pth", SwinV2Encoder(**TINY))

    sd = to_official(tiny().state_dict())
    del sd["encoder.layers.2.blocks.1.attn.q_bias"]
    sd["encoder.layers.2.blocks.1.attn.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(DataError, match=r"broken\.pth.*missing.*q_bias.*unexpected.*attn\.extra"):
        load_official_checkpoint(path, SwinV2Encoder(**TINY))

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": to_official(tiny().state_dict()), "config": NotATensor()}, unsafe)
    with pytest.raises(DataError, match="unsafe.pth.*pickled code.*NotATensor"):
        load_official_checkpoint(unsafe, SwinV2Encoder(**TINY))


def test_official_training_checkpoint_with_a_yacs_config_loads_without_running_its_code(
    tmp_path, monkeypatch
) -> None:
    """SimMIM saves {'model': ..., 'config': CfgNode, ...}; the CfgNode arrives as inert data."""
    import sys
    import types

    fake = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __setstate__(self, state):  # the real class would run this: ours must not
            raise AssertionError("original class code ran during load")

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    fake.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", fake)
    cfg = CfgNode(MODEL={"TYPE": "swinv2"}, DATA={"IMG_SIZE": 192})
    cfg.__dict__["frozen"] = True
    src = tiny()
    path = tmp_path / "simmim_train.pth"
    torch.save({"model": to_official(src.state_dict()), "config": cfg, "epoch": 799}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # the loading machine has no yacs
    dst = SwinV2Encoder(**TINY)
    load_official_checkpoint(path, dst)
    x = image()
    assert torch.equal(dst.forward_features_masked(x), src.forward_features_masked(x))
