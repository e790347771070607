"""CKA outputs (spec B8): ``cka.json``, one CSV and one heatmap (PNG + PDF) per matrix, and the
comparison figures of several encoders; :func:`read_csv_matrix` reads a CSV back exactly.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the result type only; analysis imports this module
    from mesadepth.analysis.cka.analysis import CKAResult

__all__ = ["read_csv_matrix", "write_outputs"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "encoder"


def _nested(m: np.ndarray) -> list[Any]:
    # JSON has no NaN: undefined values are written as null.
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(m)]


def _write_csv(path: Path, m: np.ndarray, rows: str, cols: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{rows}\\{cols}", *range(m.shape[1])])
        for i, row in enumerate(m):
            # repr round-trips a float64 exactly.
            w.writerow([i, *(repr(float(v)) for v in row)])


def read_csv_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """Read back a matrix written by :func:`write_outputs` (header row and column dropped)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap(
    fig: Any,
    ax: Any,
    m: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    yticklabels: Sequence[str] | None = None,
    colorbar: bool = True,
) -> None:
    """One CKA matrix: fixed colour scale [0, 1], two-decimal cells, layer indices on the axes."""
    from matplotlib import colormaps

    cmap = colormaps["magma"].with_extremes(bad="#bbbbbb")
    rows, cols = m.shape
    im = ax.imshow(
        np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", aspect="auto"
    )
    fs = 7 if max(rows, cols) <= 9 else 5
    for i in range(rows):
        for j in range(cols):
            v = m[i, j]
            text = "nan" if not np.isfinite(v) else f"{v:.2f}"
            colour = "black" if np.isfinite(v) and v > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=fs, color=colour)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    if yticklabels is not None:
        ax.set_yticklabels(yticklabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(im, ax=ax, label="CKA", fraction=0.046, pad=0.04)


def _save(fig: Any, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    # The layout is settled by the first save; solving it again for the PDF only costs time.
    fig.set_layout_engine("none")
    fig.savefig(paths[1])
    return paths


def _subtitle(result: CKAResult) -> str:
    return f"{result.label()}, n={result.n_images}, {result.mode}"


def write_outputs(
    result: CKAResult,
    out_dir: str | os.PathLike[str],
    encoder_info: Mapping[str, Mapping[str, Any]] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``cka.json``, one CSV and one heatmap (PNG + PDF) per matrix, and summaries (B8).

    Files: ``within_<name>.*`` (layer x layer of one encoder), ``cross_<A>__<B>.*`` (rows A,
    columns B); with several encoders ``comparison.*`` (the within heatmaps side by side and
    each encoder's layer-0 row as a line plot, plus the pairs' diagonals), ``layer0_rows.*``
    (one strip per encoder) and, with pairs, ``cross_diagonal.*`` (rows = pairs, columns =
    layers). ``encoder_info``: per name, e.g. checkpoint path; ``source``: dataset description.
    Returns {label: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sub = _subtitle(result)

    roles: dict[str, str] = {}
    for a, b in result.cross:
        roles[a] = "pre" if roles.get(a, "pre") == "pre" else "pre+fine"
        roles[b] = "fine" if roles.get(b, "fine") == "fine" else "pre+fine"
    doc: dict[str, Any] = {
        "spec": "teacher-and-cka.md Part B",
        "encoders": [
            {
                "name": n,
                **{
                    k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                    for k, v in (encoder_info or {}).get(n, {}).items()
                },
                "role": roles.get(n, "single"),
                "layers": result.layers.get(n, []),
                "input": result.inputs.get(n),
            }
            for n in result.names
        ],
        "n": result.n_images,
        "n_used": result.n_used,
        "images": {
            "ids": result.image_ids,
            "sha256": result.image_hash,
            "source": dict(source or {}),
        },
        "mode": result.mode,
        "estimator": result.estimator,
        "within": {n: _nested(m) for n, m in result.within.items()},
        "within_layer0_row": {n: _nested(m[:1])[0] for n, m in result.within.items()},
        "cross": [
            {
                "pre": a,
                "fine": b,
                "matrix": _nested(m),
                "diagonal": _nested(result.diagonal(a, b)[None])[0],
            }
            for (a, b), m in result.cross.items()
        ],
        "flags": result.flags,
        "seconds": round(result.seconds, 3),
    }
    jpath = out / "cka.json"
    jpath.write_text(json.dumps(doc, indent=1) + "\n")
    written["json"] = jpath

    for n, m in result.within.items():
        stem = out / f"within_{_safe(n)}"
        _write_csv(stem.with_suffix(".csv"), m, "layer", "layer")
        written[f"within_{n}.csv"] = stem.with_suffix(".csv")
        fig = _figure(4.6, 4.0)
        ax = fig.add_subplot()
        _heatmap(fig, ax, m, f"{n}: layer vs layer\n{sub}", "layer", "layer")
        for p in _save(fig, stem):
            written[f"within_{n}{p.suffix}"] = p
    for (a, b), m in result.cross.items():
        stem = out / f"cross_{_safe(a)}__{_safe(b)}"
        _write_csv(stem.with_suffix(".csv"), m, a, b)
        written[f"cross_{a}:{b}.csv"] = stem.with_suffix(".csv")
        fig = _figure(4.6, 4.0)
        ax = fig.add_subplot()
        _heatmap(fig, ax, m, f"{a} (pre) vs {b} (fine)\n{sub}", f"{b} layer", f"{a} layer")
        for p in _save(fig, stem):
            written[f"cross_{a}:{b}{p.suffix}"] = p

    if result.cross:
        diag_rows = [result.diagonal(a, b) for a, b in result.cross]
        width = max(len(r) for r in diag_rows)
        d = np.full((len(diag_rows), width), np.nan)
        for i, r in enumerate(diag_rows):
            d[i, : len(r)] = r
        labels = [f"{a} vs {b}" for a, b in result.cross]
        fig = _figure(max(4.5, 0.55 * width + 2.5), 1.2 + 0.45 * len(labels))
        ax = fig.add_subplot()
        _heatmap(fig, ax, d, f"pre-trained vs fine-tuned, same layer\n{sub}", "layer", "", labels)
        ax.invert_yaxis()  # first pair on top, as listed
        for p in _save(fig, out / "cross_diagonal"):
            written[f"cross_diagonal{p.suffix}"] = p

    if len(result.within) > 1:
        mats = list(result.within.items())
        width = max(m.shape[1] for _, m in mats)
        strip = np.full((len(mats), width), np.nan)
        for i, (_, m) in enumerate(mats):
            strip[i, : m.shape[1]] = m[0]
        fig = _figure(max(4.5, 0.55 * width + 2.5), 1.2 + 0.45 * len(mats))
        ax = fig.add_subplot()
        _heatmap(fig, ax, strip, f"CKA with layer 0\n{sub}", "layer", "", [n for n, _ in mats])
        ax.invert_yaxis()
        for p in _save(fig, out / "layer0_rows"):
            written[f"layer0_rows{p.suffix}"] = p
        written.update(_comparison(result, out, sub))
    return written


def _comparison(result: CKAResult, out: Path, sub: str) -> dict[str, Path]:
    """The paper's comparison: within heatmaps side by side, layer-0 rows (and diagonals) below."""
    mats = list(result.within.items())
    k = len(mats)
    lines = 2 if result.cross else 1
    fig = _figure(max(4.2 * k, 4.5 * lines + 1), 8.0)
    grid = fig.add_gridspec(2, k * lines, height_ratios=[1.15, 1.0])
    for i, (n, m) in enumerate(mats):
        ax = fig.add_subplot(grid[0, i * lines : (i + 1) * lines])
        _heatmap(fig, ax, m, n, "layer", "layer" if i == 0 else "", colorbar=i == k - 1)
    ax = fig.add_subplot(grid[1, :k] if lines == 2 else grid[1, :])
    for n, m in mats:
        ax.plot(range(m.shape[1]), m[0], marker="o", label=n)
    ax.set(xlabel="layer", ylabel="CKA with layer 0", ylim=(0, 1.02), title="layer 0 vs layer l")
    ax.set_xticks(range(max(m.shape[1] for _, m in mats)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if result.cross:
        ax = fig.add_subplot(grid[1, k:])
        for a, b in result.cross:
            d = result.diagonal(a, b)
            ax.plot(range(len(d)), d, marker="s", label=f"{a} vs {b}")
        ax.set(
            xlabel="layer",
            ylabel="CKA(pre, fine)",
            ylim=(0, 1.02),
            title="pre-trained vs fine-tuned, layer l",
        )
        ax.set_xticks(range(max(len(result.diagonal(a, b)) for a, b in result.cross)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(sub, fontsize=10)
    return {f"comparison{p.suffix}": p for p in _save(fig, out / "comparison")}
