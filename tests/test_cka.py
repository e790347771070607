"""CKA (teacher-and-cka.md Part B): the spec's numeric oracles, invariances, estimators against a
naive implementation, streaming memory, layer taps, and `mesadepth cka` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mesadepth.analysis.cka import (
    CKAAccumulator,
    FeatureStore,
    ImagePreprocess,
    TokenCKAAccumulator,
    analyse,
    cka,
    cka_from_grams,
    encoder_features,
    flatten_features,
    gram_linear,
    hsic_unbiased,
    linear_cka_features,
    make_loader,
    minibatch_cka,
    open_dataset,
    read_csv_matrix,
    u_centre_gram,
)
from mesadepth.cli import main
from mesadepth.config import load_config
from mesadepth.data.lsun import close_lmdb_envs
from mesadepth.data.world import PRESETS, SynthConfig, generate_world
from mesadepth.errors import ConfigError
from mesadepth.models.backbone import PAPER_LAYERS, build_encoder, paper_layers, save_encoder

# ---------------------------------------------------------------------------------------------
# Helpers: the spec's Demo data and a naive CKA with explicit centring matrices.


@pytest.fixture(scope="module")
def demo() -> dict[str, np.ndarray]:
    """Spec B9: legacy global seed 1337; X, then Y = randn + X, then T, drawn in that order."""
    legacy = np.random.RandomState(1337)  # the same stream as np.random.seed(1337)
    x = legacy.randn(100, 10)
    y = legacy.randn(100, 10) + x
    t = legacy.randn(10, 10)
    q = np.linalg.eigh(t.T @ t)[1]
    return {"x": x, "y": y, "t": t, "q": q}


def naive_biased(x: np.ndarray, y: np.ndarray) -> float:
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def naive_hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Spec B3's formula, term by term with explicit ones vectors."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def naive_debiased(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return naive_hsic1(k, l) / math.sqrt(naive_hsic1(k, k) * naive_hsic1(l, l))


def related(n: int, seed: int, p: int = 12, q: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Two representations sharing a 3-d latent, plus noise (CKA well inside (0, 1))."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = z @ rng.standard_normal((3, p)) + 0.7 * rng.standard_normal((n, p))
    y = np.tanh(z) @ rng.standard_normal((3, q)) + 0.7 * rng.standard_normal((n, q))
    return x, y


def random_post_norms(encoder: torch.nn.Module, seed: int) -> torch.nn.Module:
    """timm zero-initialises res-post-norm weights (constant norm1 taps); give them values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return encoder


def tiny_encoder(seed: int, depth2: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    enc = build_encoder(
        {"img_size": 64, "embed_dim": 8, "depths": (2, 2, depth2, 2), "num_heads": (1, 1, 1, 1)},
        window_size=4,
    )
    return random_post_norms(enc, seed)


# ---------------------------------------------------------------------------------------------
# B9 oracles and B1 properties.


def test_demo_oracles_linear_debiased_minibatch(demo):
    x, y = demo["x"], demo["y"]
    assert cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka_features(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)
    assert linear_cka_features(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)
    # One batch of all 100 is the debiased value exactly; 4 sequential batches of 25 are close.
    assert minibatch_cka([(x, y)]) == pytest.approx(cka(x, y, debiased=True), abs=1e-10)
    four = minibatch_cka([(x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)])
    assert four == pytest.approx(0.51327, abs=5e-6)


@pytest.mark.parametrize(
    ("t", "biased", "debiased"),
    [
        (0.2, 0.98981, 0.04954),
        (0.4, 0.74820, 0.34976),
        (0.5, 0.65483, 0.41928),
        (0.8, 0.58586, 0.48947),
        (1.0, 0.57583, 0.50161),
    ],
)
def test_demo_oracles_rbf(demo, t, biased, debiased):
    x, y = demo["x"], demo["y"]
    assert cka(x, y, kernel="rbf", threshold=t) == pytest.approx(biased, abs=5e-6)
    assert cka(x, y, kernel="rbf", debiased=True, threshold=t) == pytest.approx(debiased, abs=5e-6)


def test_invariances_and_the_general_linear_map_that_breaks_them(demo):
    x, y, t, q = demo["x"], demo["y"], demo["t"], demo["q"]
    base = cka(x, y)
    assert np.allclose(q.T @ q, np.eye(10), atol=1e-12)
    for moved in (x @ q, 1.337 * x, x + 5, x[:, ::-1]):
        assert cka(moved, y) == pytest.approx(base, abs=1e-12)
    assert cka(x @ t, y) == pytest.approx(0.40225, abs=5e-6)
    assert abs(cka(x @ t, y) - base) > 0.1
    # Debiased, RBF and minibatch share the orthogonal / isotropic-scale invariance ...
    for kw in ({"debiased": True}, {"kernel": "rbf"}, {"kernel": "rbf", "debiased": True}):
        ref = cka(x, y, **kw)
        assert cka(3.0 * x @ q, y, **kw) == pytest.approx(ref, abs=1e-10)
        assert abs(cka(x @ t, y, **kw) - ref) > 0.05
    mb = minibatch_cka([(x[i : i + 20], y[i : i + 20]) for i in range(0, 100, 20)])
    assert minibatch_cka(
        [(2.5 * x[i : i + 20] @ q, y[i : i + 20]) for i in range(0, 100, 20)]
    ) == pytest.approx(mb, abs=1e-12)
    # ... and CKA(X, X) = 1 for all of them, while shuffling the rows of one side destroys it.
    for kw in ({}, {"debiased": True}, {"kernel": "rbf"}, {"kernel": "rbf", "debiased": True}):
        assert cka(x, x, **kw) == pytest.approx(1.0, abs=1e-12)
    assert minibatch_cka([(x, x)]) == pytest.approx(1.0, abs=1e-12)
    perm = np.random.default_rng(0).permutation(100)
    assert abs(cka(x[perm], y, debiased=True)) < 0.1


def test_float64_accumulation_survives_large_offsets(demo):
    # B7: the float32 uncentred route gives ~0.03 on this input; the project must not.
    x32 = torch.tensor(demo["x"] + 1e4, dtype=torch.float32)
    y32 = torch.tensor(demo["y"], dtype=torch.float32)
    assert cka(x32, y32) == pytest.approx(0.55761, abs=1e-4)
    assert minibatch_cka([(x32, y32)]) == pytest.approx(0.51346, abs=1e-4)


def test_equals_naive_full_gram_implementation():
    x, y = related(40, seed=3, p=60, q=25)
    assert cka(x, y) == pytest.approx(naive_biased(x, y), abs=1e-10)
    assert cka(x, y, debiased=True) == pytest.approx(naive_debiased(x, y), abs=1e-10)
    k, l = x @ x.T, y @ y.T
    assert hsic_unbiased(k, l) == pytest.approx(naive_hsic1(k, l), rel=1e-10)
    # The accumulator's U-centred inner product is the same HSIC_1 (B2 = B3).
    inner = float((u_centre_gram(k) * u_centre_gram(l)).sum()) / (40 * 37)
    assert inner == pytest.approx(naive_hsic1(k, l), rel=1e-10)
    # Minibatch CKA over batches = naive sums of per-batch HSIC_1.
    batches = [slice(0, 10), slice(10, 24), slice(24, 40)]
    sums = np.zeros(3)
    for s in batches:
        kb, lb = x[s] @ x[s].T, y[s] @ y[s].T
        sums += [naive_hsic1(kb, lb), naive_hsic1(kb, kb), naive_hsic1(lb, lb)]
    expected = sums[0] / math.sqrt(sums[1] * sums[2])
    assert minibatch_cka([(x[s], y[s]) for s in batches]) == pytest.approx(expected, abs=1e-10)
    # NHWC and NCHW flattening give the same value (feature order is irrelevant).
    f = torch.randn(8, 3, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = f.square() + f.roll(1, dims=1)
    assert cka(f, g) == pytest.approx(cka(f.permute(0, 3, 1, 2), g), abs=1e-12)


def test_minibatch_converges_to_full_batch_debiased():
    x, y = related(1024, seed=7)
    full = cka(x, y, debiased=True)

    def mb(size: int, count: int | None = None) -> float:
        stop = len(x) if count is None else size * count
        return minibatch_cka([(x[i : i + size], y[i : i + size]) for i in range(0, stop, size)])

    # Fixed data, growing batches: batch = n is exact, and the error shrinks with batch size.
    errors = {b: abs(mb(b) - full) for b in (8, 64, 1024)}
    assert errors[1024] < 1e-10
    assert errors[8] > errors[64] > errors[1024]
    assert errors[64] < 0.02
    # Fixed batch size, growing batch count: the estimate approaches the full-data value.
    err_few = abs(mb(16, 2) - full)
    err_many = abs(mb(16, 64) - full)
    assert err_many < err_few and err_many < 0.02


def test_independent_features_debiased_near_zero_biased_inflated():
    rng = np.random.default_rng(11)
    n, p = 100, 1000
    biased, debiased = [], []
    for _ in range(20):
        x, y = rng.standard_normal((n, p)), rng.standard_normal((n, p))
        kx, ky = gram_linear(x), gram_linear(y)
        biased.append(cka_from_grams(kx, ky))
        debiased.append(cka_from_grams(kx, ky, debiased=True))
    expected = math.sqrt(p * p / ((n + p) * (n + p)))  # 0.909 (spec B2, B9)
    assert np.mean(biased) == pytest.approx(expected, abs=0.01)
    assert abs(np.mean(debiased)) < 0.012 and np.std(debiased) < 0.03


def test_constant_features_give_nan_not_a_number_in_range():
    x = torch.zeros(10, 6, dtype=torch.float64)
    y = torch.randn(10, 4, dtype=torch.float64)
    assert math.isnan(cka(x, y)) and math.isnan(cka(x, y, debiased=True))
    acc = CKAAccumulator(2, 1)
    acc.update([x, y], [y])
    out = acc.result()
    assert math.isnan(out[0, 0]) and out[1, 0] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Streaming state.


def test_accumulator_state_does_not_grow_with_batches():
    gen = torch.Generator().manual_seed(0)
    acc = CKAAccumulator(3, 2)

    def batch() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [torch.randn(16, 5, 4, generator=gen) for _ in range(3)],
            [torch.randn(16, 7, generator=gen) for _ in range(2)],
        )

    acc.update(*batch())
    sizes = {k: (tuple(v.shape), v.dtype) for k, v in acc.buffers().items()}
    assert sizes == {
        "hsic_ab": ((3, 2), torch.float64),
        "hsic_aa": ((3,), torch.float64),
        "hsic_bb": ((2,), torch.float64),
    }
    before = acc.hsic_ab.clone()
    nbytes = acc.nbytes
    for _ in range(40):
        acc.update(*batch())
    assert {k: (tuple(v.shape), v.dtype) for k, v in acc.buffers().items()} == sizes
    assert acc.nbytes == nbytes == (3 * 2 + 3 + 2) * 8
    assert not torch.equal(acc.hsic_ab, before)  # the state did take in the new batches
    assert (acc.batches, acc.examples) == (41, 41 * 16)
    # The token accumulator's state depends on channel counts only.
    tok = TokenCKAAccumulator(1, 1)
    tok.update([torch.randn(2, 3, 3, 4, generator=gen)], [torch.randn(2, 3, 3, 6, generator=gen)])
    tok_bytes = tok.nbytes
    for _ in range(10):
        tok.update(
            [torch.randn(2, 3, 3, 4, generator=gen)], [torch.randn(2, 3, 3, 6, generator=gen)]
        )
    assert tok.nbytes == tok_bytes == (4 * 6 + 2 * 4 + 4 * 4 + 2 * 6 + 6 * 6) * 8


def test_small_tail_batch_is_skipped_not_divided_by_zero():
    x, y = related(23, seed=1)
    acc = CKAAccumulator(1, 1)
    assert acc.update([torch.tensor(x[:20])], [torch.tensor(y[:20])])
    value = acc.result().copy()
    assert not acc.update([torch.tensor(x[20:])], [torch.tensor(y[20:])])
    assert (acc.skipped_batches, acc.skipped_examples, acc.examples) == (1, 3, 20)
    np.testing.assert_array_equal(acc.result(), value)


def test_tokens_as_examples_streams_the_exact_biased_value():
    gen = torch.Generator().manual_seed(5)
    a = [torch.randn(6, 4, 4, 3, generator=gen) + 50, torch.randn(6, 2, 2, 5, generator=gen)]
    b = [a[0] @ torch.randn(3, 4, generator=gen) + torch.randn(6, 4, 4, 4, generator=gen)]
    acc = TokenCKAAccumulator(2, 1)
    for s in (slice(0, 2), slice(2, 3), slice(3, 6)):
        acc.update([f[s] for f in a], [f[s] for f in b])
    out = acc.result()
    rows = lambda f: f.reshape(-1, f.shape[-1]).double()  # noqa: E731
    assert out[0, 0] == pytest.approx(cka(rows(a[0]), rows(b[0])), abs=1e-10)
    assert math.isnan(out[1, 0])  # 2x2 grid vs 4x4 grid: undefined (pitfall 23)


def test_feature_store_chunked_gram_equals_direct_gram():
    gen = torch.Generator().manual_seed(2)
    feats = [torch.randn(n, 3, 7, generator=gen) + 100 for n in (3, 5, 4)]
    store = FeatureStore(1)
    for f in feats:
        store.add([f])
    direct = gram_linear(torch.cat(feats).double())
    torch.testing.assert_close(store.grams(chunk_elems=24)[0], direct, rtol=1e-9, atol=1e-9)
    assert store.n == 12 and store.nbytes == 12 * 21 * 4


# ---------------------------------------------------------------------------------------------
# Encoders, taps, preprocessing and the analysis.


def test_taps_capture_the_nine_paper_layers_with_spec_shapes():
    enc = tiny_encoder(0, depth2=18).train()
    names = paper_layers(enc)
    assert names == list(PAPER_LAYERS)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = encoder_features(enc, x)
    # Spec 3.1 at 192 px, C0 = 192: 24x24x384, 12x12x768 (x6), 6x6x1536 (x2); here 64 px, C0 = 8.
    expected = [(2, 8, 8, 16)] + [(2, 4, 4, 32)] * 6 + [(2, 2, 2, 64)] * 2
    assert [tuple(f.shape) for f in feats] == expected
    assert enc.training  # the previous mode is restored
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats[-1], enc.forward_features(x), rtol=0, atol=0)
    assert flatten_features(feats[0], "mean_pool").shape == (2, 16)
    assert flatten_features(feats[0], "tokens_as_examples").shape == (128, 16)


def test_preprocess_centre_crops_resizes_and_normalises():
    prep = ImagePreprocess(480)
    assert prep.crop_box(480, 640) == (0, 480, 80, 560)  # spec B5: columns 80..559
    assert ImagePreprocess((64, 32)).crop_box(48, 64) == (0, 48, 20, 44)
    img = np.full((48, 64, 3), (10, 128, 250), dtype=np.uint8)
    img[:, :8] = 0  # outside the centre crop of a square target: must not show up
    out = ImagePreprocess(32)([img, img])
    assert out.shape == (2, 3, 32, 32)
    expected = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / (
        torch.tensor([0.229, 0.224, 0.225])
    )
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(2, 3, 32, 32))


def _image_batches(n: int, size: int, batch: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, 3)).astype(np.float64)
    # Smooth, image-like inputs: a shared low-frequency pattern plus per-image variation.
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.clip(0.5 * base + 60 * np.sin(6 * xx + 3 * yy)[None, ..., None], 0, 255)
    imgs = imgs.astype(np.uint8)
    return [
        {"image": list(imgs[i : i + batch]), "id": [str(k) for k in range(i, min(i + batch, n))]}
        for i in range(0, n, batch)
    ]


@pytest.fixture(scope="module")
def two_encoders() -> dict[str, torch.nn.Module]:
    return {"MP": tiny_encoder(1), "MP+GP": tiny_encoder(2)}


@pytest.mark.parametrize("estimator", ["minibatch", "debiased", "biased"])
def test_analyse_matrices_match_pairwise_cka_of_the_taps(two_encoders, estimator):
    batches = _image_batches(12, 64, 6, seed=0)
    res = analyse(two_encoders, batches, estimator=estimator)
    # Independent reference: collect every tap, then CKA pair by pair.
    prep = ImagePreprocess(64)
    taps = {
        n: [encoder_features(e, prep(b["image"])) for b in batches] for n, e in two_encoders.items()
    }

    def ref(a: str, i: int, b: str, j: int) -> float:
        if estimator == "minibatch":
            return minibatch_cka((fa[i], fb[j]) for fa, fb in zip(taps[a], taps[b], strict=True))
        xa = torch.cat([f[i] for f in taps[a]])
        xb = torch.cat([f[j] for f in taps[b]])
        return cka(xa, xb, debiased=estimator == "debiased")

    m = res.within["MP"]
    assert m.shape == (9, 9)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    np.testing.assert_allclose(np.diagonal(m), 1.0, atol=1e-12)
    for i, j in [(0, 1), (0, 8), (3, 5), (7, 2)]:
        assert m[i, j] == pytest.approx(ref("MP", i, "MP", j), abs=1e-9)
        assert res.cross[("MP", "MP+GP")][i, j] == pytest.approx(ref("MP", i, "MP+GP", j), abs=1e-9)
    assert res.within["MP+GP"][4, 6] == pytest.approx(ref("MP+GP", 4, "MP+GP", 6), abs=1e-9)
    assert res.n_images == 12 and res.image_ids == [str(k) for k in range(12)]
    assert not res.flags


def test_invalid_combinations_and_budget_are_refused(two_encoders):
    batches = _image_batches(8, 64, 4, seed=1)
    with pytest.raises(ConfigError, match="full Gram"):
        analyse(two_encoders, batches, kernel="rbf")
    with pytest.raises(ConfigError, match="biased"):
        analyse(two_encoders, batches, mode="tokens_as_examples")
    with pytest.raises(ConfigError, match="unknown encoder name"):
        analyse(two_encoders, batches, pairs=["MP:nope"])
    with pytest.raises(ConfigError, match="hold every image"):
        analyse(two_encoders, batches, estimator="biased", feature_budget_bytes=1000)


# ---------------------------------------------------------------------------------------------
# The command line, end to end.


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    items = ["checks=false", "aux.scenes=0", "lsun.per_category=3", "ibims.images=1"]
    cfg = load_config(SynthConfig, None, items, base={"preset": "tiny", **PRESETS["tiny"]})
    out = tmp_path_factory.mktemp("world")
    generate_world(cfg, out, progress=False)
    close_lmdb_envs()
    return out


def test_cli_writes_every_output_and_matches_analyse(world, two_encoders, tmp_path, capsys):
    paths = []
    for name, enc in two_encoders.items():
        paths.append(tmp_path / f"{name}.safetensors")
        save_encoder(enc, paths[-1])
    out = tmp_path / "cka"
    args = ["cka", "--encoders", *map(str, paths), "--names", "MP", "MP+GP"]
    args += ["--pairs", "MP:MP+GP", "--data", str(world / "lsun_images"), "--dataset", "folder"]
    assert main([*args, "--out", str(out), "--batch-size", "5", "--quiet", "--device", "cpu"]) == 0
    assert "MP vs MP+GP diagonal" in capsys.readouterr().out

    direct = analyse(two_encoders, make_loader(open_dataset("folder", world / "lsun_images"), 5))
    doc = json.loads((out / "cka.json").read_text())
    # 12 images in batches of 5: the tail batch of 2 is left out of the HSIC sums (B3).
    assert doc["n"] == direct.n_images == 12 and doc["n_used"] == direct.n_used == 10
    assert doc["estimator"]["skipped_examples"] == 2
    assert doc["images"]["ids"] == direct.image_ids
    assert doc["estimator"]["name"] == "minibatch" and doc["estimator"]["batch_size"] == 5
    assert [e["role"] for e in doc["encoders"]] == ["pre", "fine"]
    for name in ("MP", "MP+GP"):
        np.testing.assert_allclose(
            read_csv_matrix(out / f"within_{name}.csv"), direct.within[name], rtol=1e-12
        )
        np.testing.assert_allclose(np.array(doc["within"][name]), direct.within[name], rtol=1e-12)
    cross = direct.cross[("MP", "MP+GP")]
    np.testing.assert_allclose(read_csv_matrix(out / "cross_MP__MP+GP.csv"), cross, rtol=1e-12)
    np.testing.assert_allclose(doc["cross"][0]["matrix"], cross, rtol=1e-12)
    np.testing.assert_allclose(doc["cross"][0]["diagonal"], np.diagonal(cross), rtol=1e-12)
    for stem in ("within_MP", "within_MP+GP", "cross_MP__MP+GP", "comparison", "cross_diagonal"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem


def test_cli_missing_encoder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "pre.safetensors"
    code = main(
        [
            "cka",
            "--encoders",
            str(missing),
            "--data",
            str(tmp_path),
            "--dataset",
            "folder",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "encoder weights" in err
    assert not (tmp_path / "o").exists()
