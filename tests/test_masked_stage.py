"""Stage 1 end to end: SimMIM input pipeline, and a short CPU run on synthetic LSUN that learns."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mesadepth.config import load_config
from mesadepth.data.simmim_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimMIMDataset,
    SimMIMTransform,
    random_resized_crop_params,
)
from mesadepth.models.simmim import MaskGenerator


def test_crop_params_follow_the_ranges_and_the_fallback():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(500):
        top, left, h, w = random_resized_crop_params(rng, 96, 128)
        assert 0 <= top and top + h <= 96 and 0 <= left and left + w <= 128
        areas.append(h * w / (96 * 128))
        ratios.append(w / h)
    # Rounding to whole pixels widens the ranges slightly; the bulk lies inside them.
    assert 0.64 < min(areas) and max(areas) <= 1.0 and np.mean(np.array(areas) > 0.9) > 0.05
    assert 0.7 < min(ratios) and max(ratios) < 1.4
    # No crop of area 5x the image exists: torchvision's fallback is the central crop, ratio clamped.
    assert random_resized_crop_params(rng, 100, 300, scale=(5, 6), ratio=(1, 2)) == (
        0,
        50,
        100,
        200,
    )


class _Images(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.images = [
            np.full((48, 64, 3), 127, np.uint8),
            np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3),
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


def test_simmim_items_are_normalised_masked_and_seeded_per_epoch_and_index():
    mask = MaskGenerator(32, 8, 4, 0.6)
    ds = SimMIMDataset(_Images(), SimMIMTransform(32, mask), seed=3)
    a = ds[0]
    expected = (127 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(a["image"][:, 5, 5], expected)  # a grey image stays grey everywhere
    assert (
        a["mask"].shape == (8, 8) and int(a["mask"].sum()) == 10 * 4
    )  # ceil(16 x 0.6) cells of 2x2 tokens
    b1, b2 = ds[1], ds[1]
    assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["mask"], b2["mask"])
    ds.set_epoch(1)
    b3 = ds[1]
    assert not torch.equal(b1["mask"], b3["mask"]) or not torch.equal(b1["image"], b3["image"])


@pytest.mark.slow
@pytest.mark.learning(seed=0)
def test_masked_stage_learns_on_synthetic_lsun(
    tmp_path: Path, learning_seed: int, learning_record: dict
):
    """A short CPU run on the synthetic world's LSUN lmdb: the masked loss falls clearly, and
    the run directory holds the encoder hand-off, the figure, the config and the metrics."""
    from mesadepth.data.lsun import close_lmdb_envs
    from mesadepth.data.world import PRESETS, SynthConfig, generate_world
    from mesadepth.stages.masked import MaskedRecipe, run_masked

    world = tmp_path / "world"
    synth = load_config(
        SynthConfig,
        None,
        [
            "video.train_scenes=1",
            "video.val_scenes=0",
            "aux.scenes=0",
            "nyu.labeled_scenes=0",
            "ibims.images=0",
            "lsun.per_category=16",
            "checks=false",
        ],
        base={"preset": "tiny", **PRESETS["tiny"]},
    )
    generate_world(synth, world, progress=False)
    close_lmdb_envs()
    run = tmp_path / "run"
    recipe = load_config(
        MaskedRecipe,
        Path(__file__).parents[1] / "configs" / "demo" / "masked.yaml",
        [
            f"run_dir={run}",
            f"data.root={world / 'lsun'}",
            "data.img_size=32",
            "encoder.img_size=32",
            "data.batch_size=16",
            "data.num_workers=0",
            "mask.patch_size=8",
            "loss.norm_target=false",
            "optim.lr_per_512=0.1",
            "trainer.max_epochs=8",
            "trainer.progress_bar=false",
            "figures=2",
            f"data.seed={learning_seed}",
            f"trainer.seed={learning_seed}",
        ],
    )
    metrics = run_masked(recipe)
    close_lmdb_envs()
    learning_record["loss end/start (< 0.8)"] = metrics["loss_end"] / metrics["loss_start"]
    assert metrics["steps"] == 8 * 4
    assert metrics["loss_end"] < 0.8 * metrics["loss_start"], metrics
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "encoder.mask_token" in keys and any(k.startswith("decoder.") for k in keys)
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert (run / "figures" / "reconstruction.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["loss_end"] == metrics["loss_end"]
    assert load_config(MaskedRecipe, run / "config.yaml") == recipe


@pytest.mark.slow
def test_masked_stage_resumes_to_the_same_weights(tmp_path: Path):
    """Deterministic mode: 2 epochs in one go == 1 epoch, stop, resume for the 2nd."""
    from safetensors.torch import load_file

    from mesadepth.data.lsun import close_lmdb_envs
    from mesadepth.data.world import PRESETS, SynthConfig, generate_world
    from mesadepth.stages.masked import MaskedRecipe, run_masked

    world = tmp_path / "world"
    synth = load_config(
        SynthConfig,
        None,
        [
            "video.train_scenes=1",
            "video.val_scenes=0",
            "aux.scenes=0",
            "nyu.labeled_scenes=0",
            "ibims.images=0",
            "lsun.per_category=8",
            "checks=false",
        ],
        base={"preset": "tiny", **PRESETS["tiny"]},
    )
    generate_world(synth, world, progress=False)
    close_lmdb_envs()

    def recipe(run: Path, epochs: int) -> MaskedRecipe:
        return load_config(
            MaskedRecipe,
            Path(__file__).parents[1] / "configs" / "demo" / "masked.yaml",
            [
                f"run_dir={run}",
                f"data.root={world / 'lsun'}",
                "data.img_size=32",
                "encoder.img_size=32",
                "encoder.drop_path_rate=0.1",
                "data.batch_size=8",
                "data.num_workers=0",
                "mask.patch_size=8",
                f"trainer.max_epochs={epochs}",
                "trainer.deterministic=true",
                "trainer.progress_bar=false",
                "figures=1",
            ],
        )

    class Kill(Exception):
        pass

    class KillAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise Kill  # after the epoch's checkpoint, like a job killed there

    run_masked(recipe(tmp_path / "a", 2))
    with pytest.raises(Kill):
        run_masked(recipe(tmp_path / "b", 2), callbacks=(KillAfterFirstEpoch(),))
    assert not (tmp_path / "b" / "model.safetensors").exists()
    run_masked(recipe(tmp_path / "b", 2))  # resumes from b/checkpoints/last.ckpt
    close_lmdb_envs()
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
