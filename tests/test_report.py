"""report.md pieces: the paper's relative-improvement row, the honest ordering sentence, and the
statements computed from the run's files (stage verdicts, pose source, teacher quality)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from mesadepth.report import (
    IBIMS_COLUMNS,
    NYU_COLUMNS,
    ordering_statement,
    pose_source_statement,
    pretraining_table,
    relative_improvement,
    table_markdown,
    teacher_statement,
    write_report,
)

MP = {"rmse": 0.400, "d1": 0.800, "d2": 0.950, "d3": 0.990, "abs_rel": 0.120, "log10": 0.050}
MESA = {"rmse": 0.300, "d1": 0.880, "d2": 0.950, "d3": 0.990, "abs_rel": 0.090, "log10": 0.040}


def test_relative_improvement_signs_follow_the_column_direction():
    imp = relative_improvement(MP, MESA, NYU_COLUMNS)
    assert math.isclose(imp["rmse"], 25.0)  # (0.4 - 0.3) / 0.4
    assert math.isclose(imp["d1"], 10.0)  # (0.88 - 0.8) / 0.8, higher is better
    assert imp["d2"] == 0.0
    assert math.isclose(imp["abs_rel"], 25.0)
    worse = relative_improvement(MESA, MP, NYU_COLUMNS)
    assert worse["rmse"] < 0 and worse["d1"] < 0
    assert math.isnan(relative_improvement({"rmse": None}, MESA, NYU_COLUMNS)["rmse"])


def test_table_has_one_row_per_variant_and_the_improvement_row():
    text = table_markdown({"MP": MP, "MP+GP+SP": MESA}, NYU_COLUMNS, ("MP", "MP+GP+SP"))
    lines = text.splitlines()
    assert lines[0].startswith("| pre-training | RMSE ↓ | δ1 ↑")
    assert lines[2] == "| MP | 0.400 | 0.800 | 0.950 | 0.990 | 0.120 | 0.050 |"
    assert lines[-1].startswith("| MP+GP+SP vs MP | +25.0 % | +10.0 % | +0.0 %")


def test_ordering_statement_says_when_the_paper_ordering_is_absent():
    paper = {"MP": {"rmse": 0.3}, "MP+GP": {"rmse": 0.28}, "MP+GP+SP": {"rmse": 0.27}}
    assert "the ordering the paper reports" in ordering_statement(paper, "rmse", "RMSE")
    flipped = {"MP": {"rmse": 0.27}, "MP+GP": {"rmse": 0.28}, "MP+GP+SP": {"rmse": 0.3}}
    s = ordering_statement(flipped, "rmse", "RMSE")
    assert "does not appear" in s and "best here is MP." in s


def test_write_report_reads_the_run_files(tmp_path):
    for v, nyu, ibims in (
        ("MP", MP, {"dbe_acc": 3.0, "dbe_com": 8.0, "pe_fla": 4.0, "pe_ori": 20.0, "rel": 0.2}),
        (
            "MP+GP+SP",
            MESA,
            {"dbe_acc": 2.0, "dbe_com": 6.0, "pe_fla": 3.0, "pe_ori": 15.0, "rel": 0.1},
        ),
    ):
        d = tmp_path / "evaluate" / v.replace("+", "_")
        d.mkdir(parents=True)
        (d / "nyu.json").write_text(json.dumps({"mean": nyu, "count": 7}))
        (d / "ibims.json").write_text(json.dumps({"mean": ibims}))
    (tmp_path / "masked").mkdir()
    (tmp_path / "masked" / ".done.json").write_text(json.dumps({"seconds": 12.5}))
    path = write_report(tmp_path, ["MP", "MP+GP+SP"], {}, None, notes=["Demo note."])
    text = path.read_text()
    assert "Demo note." in text
    assert "| MP+GP+SP vs MP | +25.0 % | +10.0 %" in text
    # IBims: every column lower-is-better; dbe_acc 3 -> 2 is a 33.3 % improvement.
    assert "| MP+GP+SP vs MP | +33.3 % | +25.0 % | +25.0 % | +25.0 % | +50.0 % |" in text
    assert "| masked | 12.5 |" in text
    assert [c[0] for c in IBIMS_COLUMNS] == ["dbe_acc", "dbe_com", "pe_fla", "pe_ori", "rel"]


def test_pretraining_table_gives_each_stage_its_losses_and_a_depth_verdict(tmp_path):
    def metrics(step: str, **m) -> None:
        (tmp_path / step).mkdir()
        (tmp_path / step / "metrics.json").write_text(json.dumps(m))

    metrics("masked", steps=120, loss_start=0.8, loss_end=0.6)
    depth = {"validation_mode": "depth", "baseline_constant_depth": {"abs_rel": 0.2}}
    # GP: 0.2 -> 0.15, below 95 % of the constant map's 0.2; SP: 0.15 -> 0.195, above 0.19.
    metrics(
        "geometric",
        steps=90,
        loss_start={"photo": 0.3},
        loss_end={"photo": 0.25},
        validation_start={
            "abs_rel": 0.2,
            "pose_t_cos": 0.01,
            "pose_rot_err_deg": 14.25,
            "pose_pair_cos": 1.0,
        },
        validation={
            "abs_rel": 0.15,
            "pose_t_cos": 0.62,
            "pose_rot_err_deg": 1.04,
            "pose_rot_none_deg": 2.13,
            "pose_pair_cos": -0.874,
        },
        **depth,
    )
    metrics(
        "supervised",
        steps=90,
        loss_start={"photo": 0.25},
        loss_end={"photo": 0.24},
        validation_start={"abs_rel": 0.15, "pose_pair_cos": -0.874},
        validation={"abs_rel": 0.195, "pose_pair_cos": 0.996},  # photo mode: no true path
        **depth,
    )
    rows = [line for line in pretraining_table(tmp_path) if line.startswith("| ")][1:]
    assert rows == [
        "| MP | 120 | masked L1 0.800 → 0.600 | – | – | (no depth validation) | – |",
        "| GP | 90 | photometric 0.300 → 0.250 | 0.2000 → 0.1500 | 0.2000 | yes | t cos +0.01 → "
        "+0.62; rotation error 14.2° → 1.0° (none: 2.1°); pair cos +1.00 → -0.87 |",
        "| SP | 90 | photometric 0.250 → 0.240 | 0.1500 → 0.1950 | 0.2000 | **no: worse than "
        "where it started** | pair cos -0.87 → +1.00 |",
    ]
    text = "\n".join(pretraining_table(tmp_path))
    assert "GP ended at 75% of the constant map's AbsRel (0.2000 → 0.1500)." in text
    assert "**Warning: SP's held-out depth got worse during the stage (0.1500 → 0.1950).**" in text
    assert "SP did not end below GP's end (0.1950 vs 0.1500)." in text
    assert pretraining_table(tmp_path / "nothing") == []


def test_a_stage_below_its_start_but_near_the_constant_map_learned_nothing(tmp_path):
    (tmp_path / "supervised").mkdir()
    m = {
        "steps": 9,
        "validation_mode": "depth",
        "baseline_constant_depth": {"abs_rel": 0.2},
        "validation_start": {"abs_rel": 0.2},
        "validation": {"abs_rel": 0.195},  # above 95 % of 0.2
    }
    (tmp_path / "supervised" / "metrics.json").write_text(json.dumps(m))
    text = "\n".join(pretraining_table(tmp_path))
    assert "| no: no better than a constant map |" in text and "Warning" not in text


def test_pose_source_and_teacher_sentences_come_from_the_run_files(tmp_path):
    for step, source in (("geometric", "poses"), ("supervised", None)):
        (tmp_path / step).mkdir()
        pose = {"source": source} if source else {"scale": 0.01}  # absent key = the PoseNet
        (tmp_path / step / "config.yaml").write_text(yaml.safe_dump({"pose": pose}))
    words = " ".join(pose_source_statement(tmp_path))
    assert words.startswith("GP took the camera motion between frames from the scenes' known")
    assert "SP learned the camera motion with a PoseNet" in words
    assert pose_source_statement(tmp_path / "none") == []

    (tmp_path / "pseudo_depth").mkdir()
    q = {
        "measured": True,
        "val": {
            "frames": 40,
            "pseudo_depth": {"abs_rel": 0.15},
            "constant_depth": {"abs_rel": 0.2},
        },
    }
    (tmp_path / "pseudo_depth" / "quality.json").write_text(json.dumps(q))
    assert teacher_statement(tmp_path)[0] == (
        "The supervised stage's teacher, as measured in this run: its pseudo-depth scores a "
        "median-scaled AbsRel of 0.1500 on the held-out video scenes (40 frames; a constant "
        "map: 0.2000, so 75% of it)."
    )
    (tmp_path / "pseudo_depth" / "quality.json").write_text(
        json.dumps({"measured": False, "reason": "no depth"})
    )
    assert teacher_statement(tmp_path)[0] == "The teacher's pseudo-depth was not scored: no depth."


_FIGURE = re.compile(r"\d+(\.\d+)?\s*%|\d\.\d{2,}")


@pytest.mark.parametrize("recipes", ["demo", "paper"])
def test_pipeline_notes_claim_no_measured_figure(recipes):
    """A report states only what its run measured: fixed notes explain, they carry no result
    (a percentage or a figure with two or more decimals)."""
    path = Path(__file__).parents[1] / "configs" / recipes / "pipeline.yaml"
    notes = (yaml.safe_load(path.read_text()).get("report") or {}).get("notes") or []
    for note in notes:
        assert not _FIGURE.search(note), f"{path}: a report note quotes a figure: {note!r}"
    assert _FIGURE.search("scores 0.178") and _FIGURE.search("82 % of")  # the check bites
