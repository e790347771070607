"""Depth fine-tuning (spec 2.1-2.8): encoder init, CutDepth counter, layer-decay groups in the
optimizer, resume, and a short CLI run on the tiny world that beats the mean-depth baseline."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from mesadepth.cli import build_parser, main
from mesadepth.config import load_config
from mesadepth.errors import ConfigError, MissingFileError
from mesadepth.evaluation.metrics import METRIC_NAMES
from mesadepth.models.backbone import build_encoder, save_encoder, trained_window_sizes
from mesadepth.models.depth_head import load_depth_model
from mesadepth.optim import TriangleSchedule
from mesadepth.stages.finetune import (
    EpochPositionSampler,
    FinetuneRecipe,
    build_finetune_encoder,
    run_finetune,
)

DEMO = Path(__file__).parents[1] / "configs" / "demo" / "finetune.yaml"


def tiny_recipe(world: Path, run: Path, *overrides: str) -> FinetuneRecipe:
    """The demo recipe shrunk to the tiny world: 32 px crops of 64x48 frames, 8 training pairs."""
    return load_config(
        FinetuneRecipe,
        DEMO,
        [
            f"run_dir={run}",
            "init=random",
            f"data.root={world / 'nyu'}",
            "data.crop=[32, 32]",
            "encoder.window_size=4",
            "data.batch_size=4",
            "data.num_workers=0",
            "trainer.progress_bar=false",
            "trainer.max_epochs=4",
            "validation.every_n_epochs=0",
            "figures=0",
            *overrides,
        ],
    )


def _encoder_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny encoder as the masked stage writes it: 64 px, window 4, random weights."""
    torch.manual_seed(7)
    enc = build_encoder("tiny-cpu", layer_norm_eps=1e-5)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from any default initialisation
    path = save_encoder(enc, tmp_path / "masked.safetensors", metadata={"stage": "masked"})
    return path, load_file(path)


def test_trained_windows_are_the_pre_training_windows_clipped_to_the_token_maps():
    # Spec 2.1 / pitfall 9: 192 px, window 12 -> maps 48, 24, 12, 6 -> (12, 12, 12, 6).
    cfg = {"img_size": [192, 192], "patch_size": 4, "depths": [2, 2, 18, 2], "window_size": 12}
    assert trained_window_sizes({**cfg, "pretrained_window_sizes": 0}) == [[12, 12]] * 3 + [[6, 6]]
    # Explicit pre-training windows in the file win (a file that was itself fine-tuned).
    given = {**cfg, "pretrained_window_sizes": [8, 8, 8, 4]}
    assert trained_window_sizes(given) == [[8, 8]] * 3 + [[4, 4]]


def test_init_from_an_encoder_file_loads_every_weight_at_the_new_geometry(tmp_path, tiny_world):
    path, saved = _encoder_file(tmp_path)
    for preset in ("tiny-cpu", None):  # a named architecture, or the file's own
        recipe = tiny_recipe(
            tiny_world, tmp_path / "run", f"init={path}", f"encoder.preset={preset or 'null'}"
        )
        encoder, info = build_finetune_encoder(recipe)
        assert info["kind"] == "encoder"
        assert tuple(encoder.patch_embed.img_size) == (32, 32)  # the crop, not the file's 64
        # 64 px, window 4: maps 16, 8, 4, 2 -> the position bias was trained with 4, 4, 4, 2.
        assert encoder.config["pretrained_window_sizes"] == [4, 4, 4, 2]
        state = encoder.state_dict()
        assert {f"encoder.{k}" for k in state} == set(saved)
        for key, value in saved.items():
            assert torch.equal(state[key.removeprefix("encoder.")], value), key
    random_encoder, info = build_finetune_encoder(tiny_recipe(tiny_world, tmp_path / "r"))
    assert info["kind"] == "random"
    w = "layers.2.blocks.0.attn.qkv.weight"
    assert not torch.equal(random_encoder.state_dict()[w], saved[f"encoder.{w}"])


def test_init_from_an_official_pth_and_the_errors_that_name_the_fix(tmp_path, tiny_world):
    path, saved = _encoder_file(tmp_path)
    pth = tmp_path / "simmim.pth"
    # SimMIM's layout: {"model": {"encoder.*", "decoder.*"}}; the decoder is dropped.
    torch.save({"model": {**saved, "decoder.0.weight": torch.zeros(3, 3)}}, pth)
    recipe = tiny_recipe(
        tiny_world, tmp_path / "run", f"init={pth}", "encoder.pretrained_window_sizes=[4,4,4,2]"
    )
    encoder, info = build_finetune_encoder(recipe)
    assert info["kind"] == "official"
    for key, value in saved.items():
        assert torch.equal(encoder.state_dict()[key.removeprefix("encoder.")], value), key
    # auto cannot read windows from a .pth, and tiny-cpu has none: a clear error, not a guess.
    with pytest.raises(ConfigError, match="pretrained_window_sizes"):
        build_finetune_encoder(tiny_recipe(tiny_world, tmp_path / "run", f"init={pth}"))
    with pytest.raises(MissingFileError, match="init weights"):
        build_finetune_encoder(tiny_recipe(tiny_world, tmp_path / "run", "init=nope.safetensors"))
    with pytest.raises(ConfigError, match="encoder.preset is null"):
        build_finetune_encoder(tiny_recipe(tiny_world, tmp_path / "run", "encoder.preset=null"))


def test_sampler_positions_follow_the_global_order_and_survive_a_resume():
    """The CutDepth counter is the position in the epoch's order over all ranks."""
    single = EpochPositionSampler(12, seed=3, drop_last=True, num_replicas=1, rank=0)
    single.set_epoch(2)
    items = list(single)
    assert [p for _, p, _ in items] == list(range(12)) and {e for e, _, _ in items} == {2}
    order = single.epoch_order(2).tolist()
    assert [k for _, _, k in items] == order
    # Rank 1 of 3 takes global positions 1, 4, 7, 10 -> CutDepth (every 4th) on position 4 only.
    r1 = EpochPositionSampler(12, seed=3, drop_last=True, num_replicas=3, rank=1)
    r1.set_epoch(2)
    assert [(p, k) for _, p, k in r1] == [(p, order[p]) for p in (1, 4, 7, 10)]
    r1.set_start(2, epoch=2)  # two of this rank's samples were consumed before the kill
    assert [(p, k) for _, p, k in r1] == [(p, order[p]) for p in (7, 10)]


def test_layer_decay_groups_reach_the_optimizer_with_the_spec_scales(tmp_path, tiny_world):
    recipe = tiny_recipe(
        tiny_world,
        tmp_path / "run",
        "trainer.max_steps=3",
        "validation.enabled=false",
        "optim.layer_decay=0.8",
    )
    seen: list[tuple[int, list[dict]]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            groups = trainer.optimizers[0].param_groups
            seen.append((trainer.global_step, [dict(g) for g in groups]))
            self.module = pl_module

    rec = Record()
    run_finetune(recipe, callbacks=(rec,))
    model = rec.module.model
    # tiny-cpu depths (1, 1, 2, 1): K = 2 + 2 + 3 + 1 + 2 = 10 slots; timm names (spec 2.5).
    expected_id = {
        "patch_embed": 0,
        "layers.0.blocks.0": 1,
        "layers.1.downsample": 2,
        "layers.1.blocks.0": 3,
        "layers.2.downsample": 4,
        "layers.2.blocks.0": 5,
        "layers.2.blocks.1": 6,
        "layers.3.downsample": 7,
        "layers.3.blocks.0": 8,
    }
    step0, groups = seen[0]
    owner = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name == "encoder.mask_token":
            assert id(p) not in owner and not p.requires_grad  # unused in depth prediction
            continue
        rest = name.removeprefix("encoder.")
        layer = next((v for k, v in expected_id.items() if rest.startswith(k + ".")), 9)
        g = owner[id(p)]
        assert g["layer_id"] == layer, name
        assert g["lr_scale"] == pytest.approx(0.8 ** (9 - layer)), name
        no_decay = p.ndim == 1 or name.endswith(".bias") or "cpb_mlp" in name or "logit" in name
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    # Each group runs at the triangle lr of its step times its scale, set before the forward.
    n = 2  # 8 pairs / batch 4
    schedule = TriangleSchedule(recipe.optim.max_lr, recipe.optim.min_lr, n, 4, 0.9)
    assert [s for s, _ in seen] == [0, 1, 2]
    for step, gs in seen:
        for g in gs:
            assert g["lr"] == pytest.approx(schedule.lr_at(step + 1) * g["lr_scale"], rel=1e-12)
    assert seen[2][1][0]["lr"] > seen[0][1][0]["lr"]  # ramping up


class Kill(Exception):
    pass


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Kill  # before this step's checkpoint: last.ckpt holds step - 1


@pytest.mark.slow
def test_a_killed_run_resumes_mid_epoch_to_the_same_weights(tmp_path, tiny_world):
    def recipe(run: Path) -> FinetuneRecipe:
        return tiny_recipe(
            tiny_world,
            run,
            "data.batch_size=2",  # 4 steps per epoch
            "trainer.max_epochs=2",
            "trainer.deterministic=true",
            "trainer.checkpoint_every_n_steps=1",
            "encoder.drop_path_rate=0.2",  # RNG inside the model too
            "validation.enabled=false",
        )

    run_finetune(recipe(tmp_path / "a"))
    with pytest.raises(Kill):
        run_finetune(recipe(tmp_path / "b"), callbacks=(KillAtStep(6),))
    assert not (tmp_path / "b" / "model.safetensors").exists()
    metrics = run_finetune(recipe(tmp_path / "b"))  # resumes at step 5, in epoch 1
    assert metrics["steps"] == 8
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.learning(seed=0)
def test_cli_fine_tune_writes_the_run_and_beats_the_mean_depth(
    tmp_path, tiny_world, capsys, learning_seed, learning_record
):
    """`mesadepth finetune` on the tiny world: 40 steps from random weights predict the held-out
    test scene better than the training set's mean depth does (a learning check)."""
    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        "init=random",
        f"data.root={tiny_world / 'nyu'}",
        "data.crop=[32,32]",
        "encoder.window_size=4",
        "data.batch_size=4",
        "data.num_workers=0",
        "optim.max_lr=5e-3",
        "trainer.max_epochs=20",
        "trainer.progress_bar=false",
        "validation.every_n_epochs=10",
        "figures=2",
        f"data.seed={learning_seed}",
        f"trainer.seed={learning_seed}",
    ]
    assert main(["finetune", "--config", str(DEMO), *args]) == 0
    out = capsys.readouterr().out
    assert "RMSE" in out and "training mean depth" in out

    metrics = json.loads((run / "metrics.json").read_text())
    val, base = metrics["validation"], metrics["baseline_mean_depth"]
    learning_record["loss end/start (< 0.8)"] = metrics["loss_end"] / metrics["loss_start"]
    learning_record["RMSE / mean-depth RMSE (< 0.85)"] = val["rmse"] / base["rmse"]
    assert metrics["steps"] == 40 and val["n_images"] == 3
    assert set(METRIC_NAMES) <= set(val) and set(METRIC_NAMES) <= set(base)
    assert metrics["loss_end"] < 0.8 * metrics["loss_start"]
    assert val["rmse"] < 0.85 * base["rmse"], (val, base)
    assert [h["epoch"] for h in metrics["validation_history"]] == [10, 20]
    assert metrics["validation_history"][-1]["rmse"] == val["rmse"]

    model = load_depth_model(run / "model.safetensors")
    assert tuple(model.encoder.patch_embed.img_size) == (32, 32)
    from mesadepth.models.backbone import read_metadata

    meta = read_metadata(run / "model.safetensors")
    assert meta["stage"] == "finetune" and meta["init"] == "random"
    assert (run / "figures" / "depth_preview.png").stat().st_size > 5000
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert load_config(FinetuneRecipe, run / "config.yaml") == load_config(
        FinetuneRecipe, DEMO, args
    )


def test_help_teaches_the_init_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = capsys.readouterr().out
    for key in ("init=random", ".pth", "model.safetensors", "optim.layer_decay", "data.crop"):
        assert key in text, key
