"""``report.md`` of a pipeline run: the paper's Table 1 and Table 2 rows, CKA figures, previews.

Everything here reads files the pipeline steps wrote (``<stage>/metrics.json`` and
``config.yaml``, ``pseudo_depth/quality.json``, ``evaluate/<V>/{nyu,ibims}.json``,
``cka/*.png``, ``finetune/<V>/model.safetensors``, ``<step>/.done.json``), so a report can be
rebuilt from a finished run directory without training anything. Every figure and every
statement about what a stage learned comes from those files; the fixed text only explains.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mesadepth.io import atomic_write_text

__all__ = [
    "IBIMS_COLUMNS",
    "NYU_COLUMNS",
    "ordering_statement",
    "pose_source_statement",
    "pretraining_table",
    "relative_improvement",
    "table_markdown",
    "teacher_statement",
    "write_report",
]

# (key in metrics.json, header, lower is better)
NYU_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("rmse", "RMSE", True),
    ("d1", "δ1", False),
    ("d2", "δ2", False),
    ("d3", "δ3", False),
    ("abs_rel", "AbsRel", True),
    ("log10", "log10", True),
)
"""MeSa Table 1 columns, in the paper's order."""

IBIMS_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("dbe_acc", "ε_acc (DBE)", True),
    ("dbe_com", "ε_comp (DBE)", True),
    ("pe_fla", "ε_plan (PE)", True),
    ("pe_ori", "ε_orie (PE)", True),
    ("rel", "AbsRel", True),
)
"""MeSa Table 2 columns (IBims-1: boundary, planarity, AbsRel), in the paper's order."""


def _num(x: Any) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return math.nan
    return f


def relative_improvement(
    base: Mapping[str, Any], new: Mapping[str, Any], columns: Sequence[tuple[str, str, bool]]
) -> dict[str, float]:
    """Per column, how much ``new`` improves on ``base`` in percent (positive = better).

    Lower-is-better columns: (base - new) / base; higher-is-better: (new - base) / base, as the
    paper's relative-improvement row reads.
    """
    out: dict[str, float] = {}
    for key, _, lower in columns:
        b, n = _num(base.get(key)), _num(new.get(key))
        if not (math.isfinite(b) and math.isfinite(n)) or b == 0:
            out[key] = math.nan
        else:
            out[key] = 100.0 * ((b - n) if lower else (n - b)) / abs(b)
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def table_markdown(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[tuple[str, str, bool]],
    improvement: tuple[str, str] | None = None,
) -> str:
    """A markdown table: one row per variant; ``improvement=(base, new)`` adds the paper's
    relative-improvement row of ``new`` over ``base`` (in percent)."""
    arrows = ["↓" if lower else "↑" for _, _, lower in columns]
    head = "| pre-training | " + " | ".join(
        f"{h} {a}" for (_, h, _), a in zip(columns, arrows, strict=True)
    )
    lines = [head + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(_fmt(_num(m.get(k))) for k, _, _ in columns) + " |"
        )
    if improvement and all(v in rows for v in improvement):
        base, new = improvement
        imp = relative_improvement(rows[base], rows[new], columns)
        lines.append(
            f"| {new} vs {base} | "
            + " | ".join(
                (f"{imp[k]:+.1f} %" if math.isfinite(imp[k]) else "n/a") for k, _, _ in columns
            )
            + " |"
        )
    return "\n".join(lines)


def ordering_statement(rows: Mapping[str, Mapping[str, Any]], key: str, label: str) -> str:
    """One honest sentence: does ``key`` order the variants as the paper reports (each stage
    added improves it, MP worst, MP+GP+SP best)?"""
    order = [v for v in ("MP", "MP+GP", "MP+GP+SP") if v in rows]
    vals = {v: _num(rows[v].get(key)) for v in order}
    if len(order) < 2 or not all(math.isfinite(x) for x in vals.values()):
        return f"{label}: not enough finite values to compare the variants."
    listed = ", ".join(f"{v} {vals[v]:.4f}" for v in order)
    paper = all(vals[a] > vals[b] for a, b in zip(order, order[1:], strict=False))
    best = min(order, key=lambda v: vals[v])
    if paper:
        return f"{label}: {listed}. Each added stage lowers it, the ordering the paper reports."
    return (
        f"{label}: {listed}. The paper's ordering (each added stage lowers it) does not appear "
        f"at this scale; the best here is {best}."
    )


LEARNED_FRACTION = 0.95
"""A video stage "learned depth" when its final median-scaled AbsRel is below this fraction of
the constant-depth map's (and below its own start)."""

_STAGES = (("masked", "MP"), ("geometric", "GP"), ("supervised", "SP"))


def _depth_verdict(a0: float, a1: float, base: float) -> str:
    """The table's verdict for a stage whose depth AbsRel went from ``a0`` to ``a1``."""
    if a1 > a0:
        return "**no: worse than where it started**"
    if a1 < LEARNED_FRACTION * base:
        return "yes"
    return "no: no better than a constant map"


def _read_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def pose_source_statement(root: Path) -> list[str]:
    """Plain words on where the video stages' camera motion came from, read from the stages'
    saved recipes (``<stage>/config.yaml``, key ``pose.source``; absent = the PoseNet)."""
    sources: dict[str, str] = {}
    for step, label in _STAGES[1:]:
        cfg = _read_yaml(root / step / "config.yaml")
        if cfg is not None:
            sources[label] = str((cfg.get("pose") or {}).get("source", "posenet"))
    if not sources:
        return []
    posed = [k for k, v in sources.items() if v == "poses"]
    learned = [k for k, v in sources.items() if v != "poses"]
    lines: list[str] = []
    if posed:
        lines.append(
            f"{' and '.join(posed)} took the camera motion between frames from the scenes' known "
            "poses (`pose.source: poses`, `<scene>/poses.txt`), not from a PoseNet. The paper's "
            "recipe learns the motion with a PoseNet (`pose.source: posenet`, "
            "`configs/paper/geometric.yaml`), which needs GPU-scale training to learn it."
        )
    if learned:
        lines.append(
            f"{' and '.join(learned)} learned the camera motion with a PoseNet "
            "(`pose.source: posenet`, the reference SC-Depth recipe)."
        )
    return [" ".join(lines), ""]


def teacher_statement(root: Path) -> list[str]:
    """The teacher's pseudo-depth quality as this run measured it (``pseudo_depth/quality.json``,
    written by the pipeline's pseudo-depth step), or why it was not measured."""
    q = _read_json(root / "pseudo_depth" / "quality.json")
    if q is None:
        return []
    if not q.get("measured"):
        return [
            f"The teacher's pseudo-depth was not scored: {q.get('reason', 'no ground truth')}.",
            "",
        ]
    parts = []
    for split, words in (("val", "held-out"), ("train", "training")):
        r = q.get(split)
        if not r:
            continue
        a, b = _num(r["pseudo_depth"].get("abs_rel")), _num(r["constant_depth"].get("abs_rel"))
        parts.append(
            f"{_fmt(a, 4)} on the {words} video scenes ({int(r['frames'])} frames; a constant "
            f"map: {_fmt(b, 4)}, so {a / b:.0%} of it)"
        )
    if not parts:
        return []
    return [
        "The supervised stage's teacher, as measured in this run: its pseudo-depth scores a "
        "median-scaled AbsRel of " + " and ".join(parts) + ".",
        "",
    ]


def pretraining_table(root: Path) -> list[str]:
    """Markdown lines: what each pre-training step of ``root`` learned, from its metrics.json.

    MP: the masked-prediction loss at the start and end. GP / SP: the photometric loss, and
    where validation had depth, the median-scaled AbsRel of the depth net before and after
    training against a constant depth map's, with a verdict; a stage that trained but whose depth
    stays at the constant map's level says so, because the fine-tuning tables then measure the
    encoder it handed on, not depth it learned, and a stage whose depth got worse is flagged
    below the table. Where the run scored its PoseNet (``validation.pose``), the
    translation-direction cosine and rotation error before and after. Every figure and every
    sentence comes from the run's files.
    """
    lines: list[str] = []
    findings: list[str] = []
    for step, label in _STAGES:
        m = _read_json(root / step / "metrics.json")
        if not m:
            continue
        steps = int(_num(m.get("steps")))
        start, end = m.get("loss_start"), m.get("loss_end")
        if isinstance(start, Mapping):
            start, end = _num(start.get("photo")), _num((end or {}).get("photo"))
            loss = f"photometric {_fmt(start)} → {_fmt(end)}"
        else:
            loss = f"masked L1 {_fmt(_num(start))} → {_fmt(_num(end))}"
        v0, v1 = m.get("validation_start") or {}, m.get("validation") or {}
        base = (m.get("baseline_constant_depth") or {}).get("abs_rel")
        if m.get("validation_mode") == "depth" and base is not None and v1:
            a0, a1, b = _num(v0.get("abs_rel")), _num(v1.get("abs_rel")), _num(base)
            depth = f"{_fmt(a0, 4)} → {_fmt(a1, 4)} | {_fmt(b, 4)} | {_depth_verdict(a0, a1, b)}"
            if math.isfinite(a1) and math.isfinite(b) and b > 0:
                findings.append(
                    f"{label} ended at {a1 / b:.0%} of the constant map's AbsRel "
                    f"({_fmt(a0, 4)} → {_fmt(a1, 4)})."
                )
            if a1 > a0:
                findings.append(
                    f"**Warning: {label}'s held-out depth got worse during the stage "
                    f"({_fmt(a0, 4)} → {_fmt(a1, 4)}).**"
                )
        else:
            depth = "– | – | (no depth validation)"
        lines.append(f"| {label} | {steps} | {loss} | {depth} | {_pose_cell(v0, v1)} |")
    if not lines:
        return []
    gp = _read_json(root / "geometric" / "metrics.json") or {}
    sp = _read_json(root / "supervised" / "metrics.json") or {}
    g1 = _num((gp.get("validation") or {}).get("abs_rel"))
    s1 = _num((sp.get("validation") or {}).get("abs_rel"))
    if math.isfinite(g1) and math.isfinite(s1):
        findings.append(
            f"SP {'ended below' if s1 < g1 else 'did not end below'} GP's end "
            f"({_fmt(s1, 4)} vs {_fmt(g1, 4)})."
        )
    return [
        "## What each pre-training stage learned",
        "",
        "Each stage's own training loss, and for the video stages the depth net's median-scaled "
        "AbsRel on the held-out video scenes before and after the stage, against a constant "
        f"depth map's (learned depth: below {LEARNED_FRACTION:.0%} of it). Depth is learned "
        "from video through the motion: where the scenes carry true camera paths, the last "
        "column scores the PoseNet (translation direction cosine, 0 = unrelated, 1 = right; "
        "rotation error against that of predicting none). Its pair cosine needs no true path: "
        "the translations predicted towards the previous and the next frame point opposite "
        "ways (about -1) when the PoseNet reads the motion, the same way (+1) when it "
        "predicts one motion for every pair.",
        "",
        "| stage | steps | loss start → end | depth AbsRel start → end | constant map | "
        "learned depth | PoseNet start → end |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        *([" ".join(findings), ""] if findings else []),
        *pose_source_statement(root),
        *teacher_statement(root),
    ]


def _pose_cell(start: Mapping[str, Any], end: Mapping[str, Any]) -> str:
    parts = []
    if "pose_t_cos" in end:
        t0, t1 = _num(start.get("pose_t_cos")), _num(end.get("pose_t_cos"))
        r0, r1 = _num(start.get("pose_rot_err_deg")), _num(end.get("pose_rot_err_deg"))
        none = _num(end.get("pose_rot_none_deg"))
        parts.append(
            f"t cos {t0:+.2f} → {t1:+.2f}; rotation error {r0:.1f}° → {r1:.1f}° (none: {none:.1f}°)"
        )
    if "pose_pair_cos" in end:
        p0, p1 = _num(start.get("pose_pair_cos")), _num(end.get("pose_pair_cos"))
        parts.append(f"pair cos {p0:+.2f} → {p1:+.2f}")
    return "; ".join(parts) or "–"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def depth_previews(
    models: Mapping[str, Path],
    nyu_root: str | os.PathLike[str],
    out: Path,
    count: int = 4,
    device: str = "cpu",
) -> Path | None:
    """Side-by-side figure: RGB | ground truth | each variant's prediction, same test images.

    Uses the NYUv2 test split of ``nyu_root`` (the first ``count`` images) and one colour scale
    per row (ground truth's 2-98 percentile range), so the variants are compared fairly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mesadepth.evaluation.evaluate import model_predictor, nyu_samples
    from mesadepth.models.depth_head import load_depth_model

    root = Path(nyu_root)
    samples = []
    for s in nyu_samples(root / "nyu_depth_v2_labeled.mat", root / "splits.mat"):
        samples.append(s)
        if len(samples) >= count:
            break
    if not samples:
        return None
    preds: dict[str, list[np.ndarray]] = {}
    for name, path in models.items():
        predict = model_predictor(load_depth_model(path), device=device)
        preds[name] = [predict(s.image) for s in samples]
    cols = 2 + len(models)
    fig, axes = plt.subplots(
        len(samples), cols, figsize=(2.2 * cols, 1.8 * len(samples)), squeeze=False
    )
    for r, s in enumerate(samples):
        gt = np.asarray(s.depth, dtype=np.float32)
        valid = gt[gt > 0]
        lo, hi = np.percentile(valid, [2, 98]) if valid.size else (0.0, 10.0)
        panels = [("RGB", s.image), ("ground truth", gt)] + [
            (name, preds[name][r]) for name in models
        ]
        for c, (title, img) in enumerate(panels):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(img)
            else:
                ax.imshow(img, cmap="magma_r", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(
    root: str | os.PathLike[str],
    variants: Sequence[str],
    finetuned: Mapping[str, Path],
    nyu_root: str | None,
    notes: Sequence[str] = (),
    previews: int = 4,
    device: str = "cpu",
) -> Path:
    """Write ``<root>/report.md`` from the run's files; returns its path."""
    root = Path(root)
    lines = ["# MeSa pipeline report", ""]
    for note in notes:
        lines += [note, ""]
    nyu_rows: dict[str, dict[str, Any]] = {}
    ibims_rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        d = root / "evaluate" / v.replace("+", "_")
        nyu = _read_json(d / "nyu.json")
        ibims = _read_json(d / "ibims.json")
        if nyu:
            nyu_rows[v] = nyu.get("mean", {})
        if ibims:
            ibims_rows[v] = ibims.get("mean", {})
    improvement = ("MP", "MP+GP+SP")
    lines += pretraining_table(root)
    lines += ["## Table 1: in-distribution depth (NYUv2 protocol)", ""]
    if nyu_rows:
        n_img = None
        first = _read_json(root / "evaluate" / variants[0].replace("+", "_") / "nyu.json") or {}
        n_img = first.get("count") or len(first.get("per_image", []) or [])
        lines += [
            f"Fine-tuned with one recipe from each pre-trained encoder; {n_img or '?'} test images, "
            "Eigen crop, flip and sliding-window averaging. Lower is better for RMSE, AbsRel and "
            "log10, higher for δ1-δ3; the last row is the relative improvement of MP+GP+SP over "
            "MP, as in the paper.",
            "",
            table_markdown(nyu_rows, NYU_COLUMNS, improvement),
            "",
            ordering_statement(nyu_rows, "rmse", "RMSE"),
            "",
        ]
    else:
        lines += ["(no NYUv2 evaluation in this run)", ""]
    lines += ["## Table 2: out-of-distribution depth (IBims-1 protocol, no further training)", ""]
    if ibims_rows:
        lines += [
            "Boundary errors (accuracy, completeness, px), planarity errors (flatness in cm, "
            "orientation in degrees) and AbsRel; lower is better everywhere.",
            "",
            table_markdown(ibims_rows, IBIMS_COLUMNS, improvement),
            "",
            ordering_statement(ibims_rows, "rel", "IBims-1 AbsRel"),
            "",
        ]
    else:
        lines += ["(no IBims-1 evaluation in this run)", ""]
    cka = root / "cka"
    lines += ["## Layer-wise CKA", ""]
    if (cka / "comparison.png").is_file():
        lines += [
            "Within each pre-trained encoder, every layer against every layer (row 0 = the "
            "paper's layer-0 comparison), and each pre-trained encoder against its fine-tuned "
            "self (the diagonal = how much fine-tuning changed each layer).",
            "",
            f"![CKA comparison]({_rel(cka / 'comparison.png', root)})",
            "",
        ]
        for name in ("layer0_rows.png", "cross_diagonal.png"):
            if (cka / name).is_file():
                lines += [f"![{name[:-4]}]({_rel(cka / name, root)})", ""]
        lines += [
            "Heatmaps of every encoder (PNG and PDF) and the matrices (CSV, JSON) are in "
            f"`{_rel(cka, root)}/`.",
            "",
        ]
    else:
        lines += ["(CKA step disabled or not run)", ""]
    lines += ["## Depth previews", ""]
    present = {v: p for v, p in finetuned.items() if Path(p).is_file()}
    fig = None
    if nyu_root and present and previews > 0:
        fig = depth_previews(present, nyu_root, root / "report" / "previews.png", previews, device)
    if fig is not None:
        lines += [
            "The same NYUv2-protocol test images through each fine-tuned variant (one colour "
            "scale per row, from the ground truth).",
            "",
            f"![depth previews]({_rel(fig, root)})",
            "",
        ]
    else:
        lines += ["(no previews: no NYUv2 data or no fine-tuned model)", ""]
    lines += ["## Steps", "", "| step | seconds |", "|---|---|"]
    for done in sorted(root.rglob(".done.json")):
        info = _read_json(done) or {}
        lines.append(f"| {_rel(done.parent, root)} | {_num(info.get('seconds')):.1f} |")
    lines.append("")
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
