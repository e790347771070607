"""SimMIM mask generator, decoder, masked L1 loss and local target normalisation (spec 1.1-1.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mesadepth.errors import ConfigError, DataError
from mesadepth.losses.masked import local_normalised_target, masked_l1_loss
from mesadepth.models.simmim import (
    MaskGenerator,
    SimMIM,
    SimMIMDecoder,
    mask_to_pixels,
    pixels_to_mask,
)

# ----------------------------------------------------------------------------- mask generator


def test_mask_default_counts_and_blocks() -> None:
    gen = MaskGenerator(192, 32, 4, 0.6)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (48, 48)
    assert mask.dtype == np.int64
    assert set(np.unique(mask)) == {0, 1}
    # Every 8x8 block (one 32-px cell) is constant.
    blocks = mask.reshape(6, 8, 6, 8)
    assert (blocks == blocks[:, :1, :, :1]).all()
    # ceil(36 * 0.6) = ceil(21.6) = 22 cells, never a Bernoulli count.
    assert gen.num_masked == 22
    assert blocks[:, 0, :, 0].sum() == 22
    assert mask.mean() == pytest.approx(22 / 36)  # 61.1 %
    assert round(100 * mask.mean(), 1) == 61.1


def test_mask_count_fixed_across_draws() -> None:
    gen = MaskGenerator()
    rng = np.random.default_rng(1)
    sums = {int(gen(rng).sum()) for _ in range(20)}
    assert sums == {22 * 64}  # 22 cells x 8 x 8 tokens, every draw


def test_mask_deterministic_per_seed() -> None:
    gen = MaskGenerator()
    a = gen(np.random.default_rng(123))
    b = gen(np.random.default_rng(123))
    c = gen(np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    # Two seeds agree with probability 1 / C(36, 22) ~ 3e-10.
    assert not np.array_equal(a, c)


def test_mask_non_square_input() -> None:
    gen = MaskGenerator((64, 96), mask_patch_size=32, model_patch_size=4, mask_ratio=0.5)
    assert gen.grid_size == (2, 3)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (16, 24) == gen.token_size
    assert mask[::8, ::8].sum() == 3  # ceil(6 * 0.5)
    assert mask.sum() == 3 * 64


def test_mask_float_ceiling() -> None:
    # Pitfall 18: 100 * 0.55 = 55.000000000000007 in floating point -> 56 cells.
    assert MaskGenerator(320, 32, 4, 0.55).num_masked == 56


@pytest.mark.parametrize(
    "args",
    [
        (200, 32, 4, 0.6),  # 200 % 32 != 0
        ((192, 100), 32, 4, 0.6),  # width not divisible
        (192, 32, 5, 0.6),  # 32 % 5 != 0
        (192, 32, 4, 1.5),  # ratio outside [0, 1]
    ],
)
def test_mask_bad_config(args: tuple) -> None:
    with pytest.raises(ConfigError):
        MaskGenerator(*args)


def test_pixel_mask_aligned_squares_and_inverse() -> None:
    gen = MaskGenerator()
    token = torch.from_numpy(np.stack([gen(np.random.default_rng(s)) for s in (0, 1)]))
    pix = mask_to_pixels(token, 4)
    assert pix.shape == (2, 1, 192, 192)
    cells = pix.reshape(2, 6, 32, 6, 32)
    assert (cells == cells[:, :, :1, :, :1]).all()  # aligned 32x32 squares
    assert pix[0].float().mean().item() == pytest.approx(22 / 36)
    # Pixel (r, c) belongs to token (r // 4, c // 4).
    assert pix[1, 0, 37, 150] == token[1, 9, 37]
    torch.testing.assert_close(pixels_to_mask(pix, 4), token)
    with pytest.raises(ConfigError):
        pixels_to_mask(pix[..., :190], 4)


# ----------------------------------------------------------------------------- loss


def test_masked_l1_hand_value() -> None:
    # 1x3x4x4, masked 2x2 block at the top left. x = 0; x_hat = c + 1 in channel c on the
    # masked block and 100 elsewhere (visible, must not count).
    # Numerator: 4 pixels x (1 + 2 + 3) = 24; denominator: (4 + 1e-5) x 3.
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    x_hat = torch.full_like(x, 100.0)
    for c in range(3):
        x_hat[0, c, :2, :2] = c + 1
    m = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    m[0, 0, :2, :2] = 1
    loss = masked_l1_loss(x, x_hat, m)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(24 / (4 + 1e-5) / 3, rel=1e-12)  # 1.999995...


def test_masked_l1_ignores_visible_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    x_hat = torch.randn(2, 3, 8, 8, generator=g)
    m = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    base = masked_l1_loss(x, x_hat, m)
    noise = 10 * torch.randn(2, 3, 8, 8, generator=g) * (1 - m)
    torch.testing.assert_close(masked_l1_loss(x + noise, x_hat - noise, m), base)
    # ... while a change on a masked pixel does move it.
    bump = torch.zeros_like(x)
    bump[m.expand_as(x) > 0] = 1.0
    assert not torch.isclose(masked_l1_loss(x + bump, x_hat, m), base)


def test_masked_l1_pools_over_batch() -> None:
    # Image 0: 1 masked pixel, error 3 in every channel -> its own mean 3.
    # Image 1: 3 masked pixels, error 1 -> its own mean 1. Mean of per-image means: 2.
    # Pooled: (1 * 3 * 3 + 3 * 3 * 1) / (4 + 1e-5) / 3 = 18 / 12.00003 = 1.4999962...
    x = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    x_hat = torch.zeros_like(x)
    m = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    m[0, 0, 0, 0] = 1
    x_hat[0, :, 0, 0] = 3
    m[1, 0].view(-1)[:3] = 1
    x_hat[1].view(3, -1)[:, :3] = 1
    loss = masked_l1_loss(x, x_hat, m).item()
    assert loss == pytest.approx(18 / (4 + 1e-5) / 3, rel=1e-12)
    assert abs(loss - 2.0) > 0.4


def test_masked_l1_shape_errors() -> None:
    with pytest.raises(ConfigError):
        masked_l1_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ConfigError):
        masked_l1_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


# ----------------------------------------------------------------------------- local target


def _slow_local_norm(x: np.ndarray, k: int) -> np.ndarray:
    """Direct definition: window clipped to the image, unbiased variance, eps 1e-6."""
    r = k // 2
    out = np.empty_like(x)
    b, c, h, w = x.shape
    for bi in range(b):
        for ci in range(c):
            for i in range(h):
                for j in range(w):
                    win = x[bi, ci, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
                    var = max(0.0, win.var(ddof=1))
                    out[bi, ci, i, j] = (x[bi, ci, i, j] - win.mean()) / math.sqrt(var + 1e-6)
    return out


@pytest.mark.parametrize("k", [3, 5])
def test_local_normalised_target_matches_loops(k: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 7))
    got = local_normalised_target(torch.from_numpy(x), k)
    assert got.dtype == torch.float64 and got.shape == x.shape
    np.testing.assert_allclose(got.numpy(), _slow_local_norm(x, k), rtol=1e-9, atol=1e-9)


def test_local_normalised_target_corner_by_hand() -> None:
    # 3x3 window at the top-left corner of [[0, 2], [4, 6]] sees all 4 pixels (n = 4):
    # mean 3, unbiased var (9 + 1 + 1 + 9) / 3 = 20/3; target(0,0) = -3 / sqrt(20/3 + 1e-6).
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]], dtype=torch.float64)
    got = local_normalised_target(x, 3)
    assert got[0, 0, 0, 0].item() == pytest.approx(-3 / math.sqrt(20 / 3 + 1e-6), rel=1e-12)
    # A constant image has zero variance and zero deviation -> exactly 0.
    assert local_normalised_target(torch.full((1, 1, 6, 6), 2.5), 3).abs().max().item() < 1e-3


def test_local_normalised_target_half_computes_in_float32() -> None:
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = local_normalised_target(x.half(), 3)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("k", [4, 1, 0])
def test_local_normalised_target_bad_patch(k: int) -> None:
    with pytest.raises(ConfigError):
        local_normalised_target(torch.zeros(1, 3, 8, 8), k)


# ----------------------------------------------------------------------------- decoder / model


def test_decoder_pixel_shuffle_layout() -> None:
    dec = SimMIMDecoder(in_channels=2, encoder_stride=2, out_channels=3)
    assert [k for k in dec.state_dict()] == ["0.weight", "0.bias"]
    assert dec[0].weight.shape == (12, 2, 1, 1)
    with torch.no_grad():
        dec[0].weight.zero_()
        dec[0].bias.copy_(torch.arange(12.0))
    out = dec(torch.zeros(1, 2, 3, 4))
    assert out.shape == (1, 3, 6, 8)
    # PixelShuffle: output[c, 2i + di, 2j + dj] = conv channel c * 4 + di * 2 + dj.
    assert out[0, 1, 0, 1].item() == 5.0
    assert out[0, 2, 3, 2].item() == 2 * 4 + 1 * 2 + 0
    assert out[0, 0, 5, 7].item() == 3.0


class _PatchEmbed(nn.Module):
    def __init__(self, c0: int) -> None:
        super().__init__()
        self.patch_size = (4, 4)
        self.proj = nn.Conv2d(3, c0, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class StandInEncoder(nn.Module):
    """Tiny encoder with the SwinV2Encoder interface: stride 4 embed + mask token + stride 8."""

    def __init__(self, c0: int = 8, c_final: int = 16) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(c0)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c0))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.body = nn.Sequential(nn.GELU(), nn.Conv2d(c0, c_final, kernel_size=8, stride=8))
        self.num_features = c_final

    def forward_features_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        m = mask.unsqueeze(1).to(t.dtype)
        token = self.mask_token.reshape(1, -1, 1, 1)
        return self.body(t * (1 - m) + token * m)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 64, 64)
    gen = MaskGenerator(64, 16, 4, 0.6)
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(2)]))
    return x, mask


def test_simmim_state_dict_and_shapes() -> None:
    torch.manual_seed(0)
    model = SimMIM(StandInEncoder(), encoder_stride=32)
    keys = set(model.state_dict())
    assert "encoder.mask_token" in keys
    assert {"decoder.0.weight", "decoder.0.bias"} <= keys
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert model.decoder[0].weight.shape == (32 * 32 * 3, 16, 1, 1)
    x, mask = _batch()
    loss, rec = model(x, mask)
    assert rec.shape == x.shape
    # The returned loss is the masked L1 against the raw image with the 4x-upsampled mask.
    expected = masked_l1_loss(x, rec, mask_to_pixels(mask, 4))
    torch.testing.assert_close(loss, expected)


def test_simmim_norm_target_uses_local_normalisation() -> None:
    torch.manual_seed(0)
    model = SimMIM(StandInEncoder(), norm_target=True, norm_target_patch_size=5)
    x, mask = _batch()
    loss, rec = model(x, mask)
    expected = masked_l1_loss(local_normalised_target(x, 5), rec, mask_to_pixels(mask, 4))
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, masked_l1_loss(x, rec, mask_to_pixels(mask, 4)))
    with pytest.raises(ConfigError):
        SimMIM(StandInEncoder(), norm_target=True, norm_target_patch_size=46)


def test_simmim_mask_token_gets_gradient_only_when_masked() -> None:
    torch.manual_seed(0)
    model = SimMIM(StandInEncoder())
    x, mask = _batch()
    model(x, mask)[0].backward()
    assert model.encoder.mask_token.grad.abs().sum() > 0
    model.zero_grad()
    # With no masked token the loss is 0 and the token is never used.
    loss, _ = model(x, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0
    assert model.encoder.mask_token.grad is None or model.encoder.mask_token.grad.abs().sum() == 0


@pytest.mark.learning(seed=0)
def test_simmim_loss_falls_on_fixed_batch(learning_seed: int, learning_record: dict) -> None:
    torch.manual_seed(learning_seed)
    model = SimMIM(StandInEncoder())
    x, mask = _batch(learning_seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = model(x, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    learning_record["loss end/start (< 0.5)"] = losses[-1] / losses[0]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_simmim_rejects_encoder_without_mask_token() -> None:
    enc = StandInEncoder()
    del enc.mask_token
    with pytest.raises(ConfigError):
        SimMIM(enc)


# ----------------------------------------------------------------------------- checkpoint import


def _masked_recipe(run, init, *overrides):
    from mesadepth.config import load_config
    from mesadepth.stages.masked import MaskedRecipe

    return load_config(
        MaskedRecipe,
        None,
        [
            f"run_dir={run}",
            "encoder.preset=tiny-cpu",
            "encoder.img_size=32",
            "encoder.drop_path_rate=0.0",
            f"encoder.init={init}",
            *overrides,
        ],
    )


def _simmim_file(path, *, decoder=True, mask_token=True, decoder_rows=None):
    """An official SimMIM checkpoint ({'model': encoder.* + decoder.*}) and its SimMIM model."""
    from mesadepth.models.backbone import build_encoder, official_encoder_state

    torch.manual_seed(5)
    model = SimMIM(build_encoder("tiny-cpu", img_size=32, layer_norm_eps=1e-5), encoder_stride=32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    enc = official_encoder_state(model.encoder, mask_token=mask_token)
    state = {"encoder." + k: v for k, v in enc.items()}
    if decoder:
        w, b = model.decoder[0].weight.detach(), model.decoder[0].bias.detach()
        if decoder_rows is not None:
            w, b = w[:decoder_rows], b[:decoder_rows]
        state["decoder.0.weight"], state["decoder.0.bias"] = w.clone(), b.clone()
    torch.save({"model": state, "epoch": 99}, path)
    return model


def test_masked_stage_init_loads_the_simmim_decoder(tmp_path) -> None:
    from mesadepth.stages.masked import MaskedPretraining

    path = tmp_path / "simmim.pth"
    src = _simmim_file(path)
    module = MaskedPretraining(_masked_recipe(tmp_path / "run", path))
    for k, v in src.state_dict().items():
        assert torch.equal(module.model.state_dict()[k], v), k  # decoder included
    report = module.init_report
    assert report.decoder == "loaded" and report.reinitialised == [] and report.dropped == []
    assert "decoder.0.weight" in report.loaded and report.original_layout
    assert "decoder loaded; re-initialised: none; dropped: none" in report.summary()

    # Asked not to: a fresh decoder, and the report says which keys were dropped.
    fresh = MaskedPretraining(_masked_recipe(tmp_path / "r2", path, "encoder.init_decoder=false"))
    assert not torch.equal(fresh.model.decoder[0].weight, src.decoder[0].weight)
    assert fresh.init_report.decoder == "skipped"
    assert fresh.init_report.dropped == ["decoder.0.weight", "decoder.0.bias"]
    assert fresh.init_report.reinitialised == ["decoder.0.weight", "decoder.0.bias"]

    # A decoder that does not fit is an error naming the keys, not a silent fresh decoder.
    bad = tmp_path / "other_width.pth"
    _simmim_file(bad, decoder_rows=48)
    with pytest.raises(DataError, match=r"other_width\.pth.*decoder\.0\.weight \(file \(48, 128"):
        MaskedPretraining(_masked_recipe(tmp_path / "r3", bad))

    # A supervised Swin-v2 (no decoder, no mask token): both re-initialised and reported.
    sup = tmp_path / "sup.pth"
    _simmim_file(sup, decoder=False, mask_token=False)
    rep = MaskedPretraining(_masked_recipe(tmp_path / "r4", sup)).init_report
    assert rep.decoder == "absent"
    assert rep.reinitialised == ["encoder.mask_token", "decoder.0.weight", "decoder.0.bias"]


def test_masked_stage_continues_its_own_decoder_from_a_run_file(tmp_path) -> None:
    from mesadepth.models.backbone import save_encoder
    from mesadepth.stages.masked import MaskedPretraining

    src = _simmim_file(tmp_path / "unused.pth")
    decoder = {f"decoder.{k}": v for k, v in src.decoder.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_encoder(src.encoder, path, extra={**decoder, "pose_net.x": torch.zeros(1)})
    module = MaskedPretraining(_masked_recipe(tmp_path / "run", path))
    assert torch.equal(module.model.decoder[0].bias, src.decoder[0].bias)
    assert module.init_report.decoder == "loaded"
    assert module.init_report.dropped == ["pose_net.x"]


@pytest.mark.slow
def test_masked_run_prints_and_records_what_init_loaded(tmp_path, capsys) -> None:
    from mesadepth.io import write_png
    from mesadepth.stages.masked import run_masked

    rng = np.random.default_rng(0)
    for i in range(8):
        write_png(
            tmp_path / "images" / "room" / f"{i}.png", rng.integers(0, 255, (40, 40, 3), np.uint8)
        )
    path = tmp_path / "simmim.pth"
    _simmim_file(path)
    recipe = _masked_recipe(
        tmp_path / "run",
        path,
        "data.format=folder",
        f"data.root={tmp_path / 'images'}",
        "data.categories=null",
        "data.img_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "mask.patch_size=8",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
        "figures=1",
    )
    metrics = run_masked(recipe)
    out = capsys.readouterr().out
    assert f"init {path}: " in out and "decoder loaded" in out
    assert metrics["init"]["decoder"] == "loaded" and metrics["init"]["reinitialised"] == []
