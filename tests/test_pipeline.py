"""`mesadepth pipeline`: the whole MeSa chain on a tiny world, its report, skipping and resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_world_config

from mesadepth.cli import main
from mesadepth.config import load_config
from mesadepth.data.world import generate_world
from mesadepth.pipeline import PipelineConfig, PipelineStepError, plan, run_pipeline

DEMO = Path(__file__).parents[1] / "configs" / "demo"

QUIET = ["trainer.progress_bar=false", "data.num_workers=0"]
VIDEO = [
    "data.root={world}/video",
    "data.size=[64,64]",
    "decoder.num_ch_dec=[8,16,16,32,32]",
    "pose.width=8",
    "data.batch_size=4",
    "optim.epochs=1",
    "optim.epoch_size=2",
    "trainer.num_sanity_val_steps=0",
    "figures=1",
    *QUIET,
]
DEPTH = ["data.crop=[32,32]", "encoder.window_size=4", "data.batch_size=4", *QUIET]


def _pipeline_yaml(tmp: Path, world: Path, run: Path, finetune_recipe: str) -> Path:
    cfg = {
        "run_dir": str(run),
        "world": str(world),
        "masked": {
            "recipe": str(DEMO / "masked.yaml"),
            "overrides": [
                "data.root={world}/lsun",
                "data.img_size=32",
                "encoder.img_size=32",
                "data.batch_size=8",
                "mask.patch_size=8",
                "loss.norm_target=false",
                "trainer.max_epochs=1",
                "figures=1",
                *QUIET,
            ],
        },
        "geometric": {"recipe": str(DEMO / "geometric.yaml"), "overrides": VIDEO},
        "teacher": {
            "kind": "train",
            "recipe": str(DEMO / "teacher.yaml"),
            "overrides": [
                "data.root={world}/video_aux",
                "trainer.max_epochs=2",
                "figures=0",
                *DEPTH,
            ],
            "data": "{world}/video",
            "device": "cpu",
        },
        "supervised": {"recipe": str(DEMO / "supervised.yaml"), "overrides": VIDEO},
        "finetune": {
            "recipe": finetune_recipe,
            "overrides": [
                "data.root={world}/nyu",
                "trainer.max_epochs=2",
                "validation.every_n_epochs=0",
                "validation.baseline_images=0",
                "figures=0",
                *DEPTH,
            ],
        },
        "evaluate": {
            "nyu": "{world}/nyu",
            "ibims": "{world}/ibims",
            "device": "cpu",
            "ibims_scaled_planes": True,
        },
        "cka": {"data": "{world}/nyu", "batch_size": 4, "device": "cpu"},
        "report": {"previews": 2, "notes": ["Test run."]},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_pipeline_runs_reports_skips_and_resumes(tmp_path: Path, capsys):
    world = tmp_path / "world"
    generate_world(
        tiny_world_config("checks=false", "nyu.labeled_frames=6", "ibims.images=4"),
        world,
        progress=False,
    )
    run = tmp_path / "run"
    # 1. A step that fails names itself, its log and how to resume; earlier steps stay done.
    broken = _pipeline_yaml(tmp_path, world, run, str(tmp_path / "missing_finetune.yaml"))
    cfg = load_config(PipelineConfig, broken)
    with pytest.raises(PipelineStepError) as err:
        run_pipeline(cfg, config_path=broken)
    msg = str(err.value)
    assert "'finetune/MP'" in msg and "error.log" in msg and "mesadepth pipeline --config" in msg
    assert (run / "finetune" / "MP" / "error.log").is_file()
    done_before = {s.name for s in plan(cfg, broken) if s.is_done()}
    assert done_before == {"masked", "geometric", "teacher", "pseudo_depth", "supervised"}
    frames = sorted((world / "video" / "training").glob("*/*.jpg"))
    assert len(list((world / "video" / "training").glob("*/leres_depth/*.png"))) == len(frames)
    mp = run / "masked" / "model.safetensors"
    stamp = mp.stat().st_mtime_ns

    # 2. Fixed and run again: it resumes at the failed step and finishes every section.
    fixed = _pipeline_yaml(tmp_path, world, run, str(DEMO / "finetune.yaml"))
    capsys.readouterr()
    assert main(["pipeline", "--config", str(fixed)]) == 0
    out = capsys.readouterr().out
    for name in done_before:
        assert f"{name}: done earlier, skipped" in out
    assert "finetune/MP: running" in out and "report: running" in out
    assert mp.stat().st_mtime_ns == stamp
    report = (run / "report.md").read_text()
    for section in (
        "## What each pre-training stage learned",
        "## Table 1",
        "## Table 2",
        "## Layer-wise CKA",
        "## Depth previews",
    ):
        assert section in report
    for variant in ("MP", "MP+GP", "MP+GP+SP"):
        assert f"| {variant} | " in report
    assert "| MP+GP+SP vs MP |" in report and "Test run." in report
    quality = json.loads((run / "pseudo_depth" / "quality.json").read_text())
    a = quality["val"]["pseudo_depth"]["abs_rel"]
    assert quality["measured"] and f"median-scaled AbsRel of {a:.4f} on the held-out" in report
    assert (run / "report" / "previews.png").is_file() and (
        run / "cka" / "comparison.png"
    ).is_file()

    # 3. A third invocation does no work.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")}
    assert len(stamps) == 7  # MP, GP, SP, teacher, three fine-tuned
    capsys.readouterr()
    assert main(["pipeline", "--config", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert "running" not in out and out.count("done earlier, skipped") == len(plan(cfg, fixed))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")} == stamps


def test_placeholders_and_unknown_variants_are_checked(tmp_path: Path):
    from mesadepth.errors import ConfigError
    from mesadepth.pipeline import resolve

    cfg = load_config(
        PipelineConfig,
        None,
        ["world=/data", "run_dir=/r", "masked.overrides=['data.root={world}/lsun']"],
    )
    assert resolve(cfg).masked.overrides == ["data.root=/data/lsun"]
    bad = load_config(PipelineConfig, None, ["masked.overrides=['data.root={nowhere}']"])
    with pytest.raises(ConfigError, match="unknown placeholder"):
        resolve(bad)
    with pytest.raises(ConfigError, match="unknown"):
        resolve(load_config(PipelineConfig, None, ["variants=[MP, GP]"]))


def test_given_checkpoints_replace_stages_in_the_plan(tmp_path: Path):
    cfg = load_config(
        PipelineConfig,
        None,
        [f"run_dir={tmp_path}", "masked.checkpoint=/w/simmim.pth", "variants=[MP]"],
    )
    names = [s.name for s in plan(cfg)]
    assert names == ["finetune/MP", "evaluate/MP", "cka", "report"]
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "teacher.kind=none"])
    names = [s.name for s in plan(cfg)]
    assert "teacher" not in names and "pseudo_depth" not in names and "supervised" in names
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("recipes", ["demo", "paper"])
def test_cka_opens_every_encoder_in_the_fine_tuning_geometry(recipes: str):
    """Pitfall 25 (CKA spec): pre-trained and fine-tuned encoders are compared at the
    fine-tuning input size and windows, so the pipeline's overrides must follow finetune.yaml."""
    folder = Path(__file__).parents[1] / "configs" / recipes
    pipe = yaml.safe_load((folder / "pipeline.yaml").read_text())
    ft = yaml.safe_load((folder / pipe["finetune"]["recipe"]).read_text())
    overrides = dict(o.split("=", 1) for o in pipe["cka"]["encoder_overrides"])
    crop = ft["data"]["crop"]
    assert crop[0] == crop[1] == yaml.safe_load(overrides["img_size"])
    assert yaml.safe_load(overrides["window_size"]) == ft["encoder"]["window_size"]
