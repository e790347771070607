"""The MeSa chain end to end: MP -> GP -> SP, fine-tuning of each variant, evaluation, CKA, report.

``mesadepth pipeline --config YAML`` runs the steps below, each in its own run directory under
the pipeline's ``run_dir``; a step that finished (``<step>/.done.json``) is skipped when the
command runs again, and a step that was interrupted resumes from its ``checkpoints/last.ckpt``
(every training stage resumes by itself). The paper's recipe is ``configs/paper/pipeline.yaml``;
``mesadepth demo`` runs ``configs/demo/pipeline.yaml`` on the synthetic world on CPU.

Steps (the variant names are the paper's):

=================  ===============================================================
masked             stage 1, SimMIM (``mesadepth pretrain masked``)           -> MP
geometric          stage 2, SC-DepthV2 from MP (``pretrain geometric``)      -> MP+GP
teacher            the demo only: a depth network trained with ground truth on separate
                   scenes (``teacher.kind: train``); otherwise a given teacher spec
pseudo_depth       ``mesadepth pseudo-depth`` over the video used by stage 3
supervised         stage 3, SC-DepthV3 from MP+GP (``pretrain supervised``)  -> MP+GP+SP
finetune/<V>       ``mesadepth finetune`` of each variant V with one recipe
evaluate/<V>       NYUv2-protocol and IBims-1 metrics of each fine-tuned model
cka                within-model CKA of each pre-trained encoder; pre-trained vs fine-tuned
report             ``report.md``: Table 1 and Table 2 rows, CKA figures, depth previews
=================  ===============================================================

Strings in the configuration may use ``{run_dir}`` and ``{world}`` (and any key of ``vars``),
filled in before the step runs, so one file serves any output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mesadepth.config import load_config, save_config
from mesadepth.errors import ConfigError, MesaError, MissingFileError
from mesadepth.io import atomic_write_text

__all__ = [
    "VARIANTS",
    "PipelineConfig",
    "PipelineStepError",
    "plan",
    "run_pipeline",
]

VARIANTS = ("MP", "MP+GP", "MP+GP+SP")
"""The three pre-trained encoders the paper fine-tunes and compares (Table 1)."""

DONE_FILE = ".done.json"


# ----------------------------------------------------------------------------- configuration


@dataclass
class StageStep:
    """One training stage run from its own recipe file."""

    recipe: str = field(default="", metadata={"help": "the stage's recipe YAML"})
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "key=value overrides of that recipe"}
    )
    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "skip training and use this file as the stage's output (an encoder.* "
            "safetensors, or for masked an official SimMIM/Swin-v2 checkpoint)"
        },
    )


@dataclass
class TeacherStep:
    """Where stage 3's pseudo-depth comes from."""

    kind: Literal["given", "train", "none"] = field(
        default="given",
        metadata={
            "help": "given: use `spec` (leres:..., hf:..., files:..., mesadepth:...); train: fine-"
            "tune a depth network on ground truth of separate scenes with `recipe` (the demo's "
            "stand-in for LeReS); none: the video already holds pseudo-depth"
        },
    )
    spec: str = field(default="", metadata={"help": "teacher spec for `given`"})
    recipe: str = field(default="", metadata={"help": "finetune recipe for `train`"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "overrides of `recipe`"})
    data: str = field(default="", metadata={"help": "video root that receives pseudo-depth"})
    batch_size: int = field(default=8, metadata={"help": "pseudo-depth inference batch"})
    device: str = field(default="auto", metadata={"help": "pseudo-depth device"})


@dataclass
class EvaluateStep:
    """Evaluation of each fine-tuned variant (in and out of distribution)."""

    nyu: str | None = field(
        default=None, metadata={"help": "NYUv2 folder with nyu_depth_v2_labeled.mat and splits.mat"}
    )
    ibims: str | None = field(default=None, metadata={"help": "IBims-1 folder of .mat files"})
    flip: bool = field(default=True, metadata={"help": "flip averaging (spec 2.8)"})
    shift_window: bool = field(default=True, metadata={"help": "the two sliding windows (2.8)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    ibims_scaled_planes: bool = field(
        default=False,
        metadata={
            "help": "IBims-1 planes: the official minimum size is a share of 640 x 480 pixels; "
            "true measures it against the image's own size (needed below 640 x 480, e.g. the "
            "demo's 128 x 96, where no plane would qualify)"
        },
    )
    ibims_dbe_input: Literal["official", "masked"] = field(
        default="official",
        metadata={
            "help": "IBims-1 boundary errors on the whole prediction (official) or on the "
            "prediction masked by the valid GT pixels (masked: BS-Net's / DANet's copies)"
        },
    )


@dataclass
class CKAStep:
    """The paper's layer-wise analyses (Figures 2, 5, 8-10)."""

    enabled: bool = field(default=True, metadata={"help": "run the CKA step"})
    data: str | None = field(default=None, metadata={"help": "images (default: evaluate.nyu)"})
    dataset: Literal["nyu", "folder", "ibims"] = field(default="nyu", metadata={"help": "format"})
    batch_size: int = field(default=32, metadata={"help": "minibatch CKA batch"})
    max_images: int | None = field(default=None, metadata={"help": "cap on images"})
    encoder_overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "key=value applied to every encoder (the fine-tuning geometry)"},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})


@dataclass
class ReportStep:
    """What report.md shows beyond the tables."""

    previews: int = field(default=4, metadata={"help": "test images in the depth previews"})
    notes: list[str] = field(
        default_factory=list, metadata={"help": "paragraphs printed at the top of the report"}
    )


@dataclass
class PipelineConfig:
    """The whole MeSa chain. Every key can be overridden as key=value."""

    run_dir: str = field(default="runs/pipeline", metadata={"help": "the pipeline's folder"})
    world: str = field(
        default="", metadata={"help": "data root; fills {world} in every string below"}
    )
    vars: dict[str, str] = field(
        default_factory=dict, metadata={"help": "more {name} substitutions"}
    )
    masked: StageStep = field(default_factory=StageStep)
    geometric: StageStep = field(default_factory=StageStep)
    teacher: TeacherStep = field(default_factory=TeacherStep)
    supervised: StageStep = field(default_factory=StageStep)
    finetune: StageStep = field(default_factory=StageStep)
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS),
        metadata={"help": "which pre-trained encoders to fine-tune, evaluate and compare"},
    )
    evaluate: EvaluateStep = field(default_factory=EvaluateStep)
    cka: CKAStep = field(default_factory=CKAStep)
    report: ReportStep = field(default_factory=ReportStep)


def _fill(value: Any, table: Mapping[str, str]) -> Any:
    """``{name}`` substitution in every string of a recipe (lists and sections included)."""
    if isinstance(value, str):
        try:
            return value.format_map(table)
        except KeyError as err:
            raise ConfigError(
                f"{value!r}: unknown placeholder {{{err.args[0]}}}; known: "
                + ", ".join("{" + k + "}" for k in sorted(table))
            ) from None
    if isinstance(value, list):
        return [_fill(v, table) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, table) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        changes = {f.name: _fill(getattr(value, f.name), table) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``{run_dir}``, ``{world}`` and ``vars`` filled into every string."""
    table = {"run_dir": cfg.run_dir, "world": cfg.world, **cfg.vars}
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return _fill(cfg, table)


# ----------------------------------------------------------------------------- steps


class PipelineStepError(MesaError):
    """A step failed; the message names the step, its log and how to resume."""


@dataclass
class Step:
    """One unit of work with its own folder; ``cost`` weighs the remaining-time estimate."""

    name: str
    folder: Path
    run: Callable[[], dict[str, Any]]
    cost: float = 1.0

    @property
    def done_file(self) -> Path:
        return self.folder / DONE_FILE

    def is_done(self) -> bool:
        return self.done_file.is_file()


def _variant_dir(variant: str) -> str:
    return variant.replace("+", "_")


def _need(path: Path, what: str, step: str) -> Path:
    if not path.is_file():
        raise MissingFileError(path, what, f"written by the pipeline step {step!r}")
    return path


class _Chain:
    """The concrete steps of one configuration and the files they hand to each other."""

    def __init__(
        self, cfg: PipelineConfig, command: list[str] | None, base_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.root = Path(cfg.run_dir)
        self.command = command
        self.base_dir = base_dir

    def recipe(self, path: str, what: str) -> Path:
        """A recipe path: absolute, or relative to the pipeline file's folder, or to the CWD."""
        if not path:
            raise ConfigError(f"{what}.recipe is empty: name the stage's recipe YAML")
        p = Path(path)
        if not p.is_absolute() and self.base_dir is not None and (self.base_dir / p).is_file():
            return self.base_dir / p
        if not p.is_file():
            raise MissingFileError(p, f"the {what} recipe", "named in the pipeline recipe")
        return p

    # Where each variant's pre-trained encoder is.
    def encoder_of(self, variant: str) -> Path:
        stage = {"MP": "masked", "MP+GP": "geometric", "MP+GP+SP": "supervised"}[variant]
        given = getattr(self.cfg, stage).checkpoint
        return Path(given) if given else self.root / stage / "model.safetensors"

    def finetuned(self, variant: str) -> Path:
        return self.root / "finetune" / _variant_dir(variant) / "model.safetensors"

    def _stage(self, name: str, step: StageStep, init: Path | None) -> dict[str, Any]:
        folder = self.root / name
        overrides = [*step.overrides, f"run_dir={folder}"]
        if init is not None:
            overrides.append(f"init={init}")
        return run_stage(name, self.recipe(step.recipe, name), overrides, self.command)

    def steps(self) -> list[Step]:
        cfg, root = self.cfg, self.root
        variants = set(cfg.variants)
        out: list[Step] = []
        needs_gp = variants & {"MP+GP", "MP+GP+SP"}
        needs_sp = "MP+GP+SP" in variants
        if not cfg.masked.checkpoint:
            out.append(
                Step("masked", root / "masked", lambda: self._stage("masked", cfg.masked, None), 2)
            )
        if needs_gp and not cfg.geometric.checkpoint:
            out.append(
                Step(
                    "geometric",
                    root / "geometric",
                    lambda: self._stage("geometric", cfg.geometric, self.encoder_of("MP")),
                    3,
                )
            )
        if needs_sp and not cfg.supervised.checkpoint:
            if cfg.teacher.kind == "train":
                out.append(Step("teacher", root / "teacher", self._train_teacher, 2))
            if cfg.teacher.kind != "none":
                out.append(Step("pseudo_depth", root / "pseudo_depth", self._pseudo_depth, 0.5))
            out.append(
                Step(
                    "supervised",
                    root / "supervised",
                    lambda: self._stage("supervised", cfg.supervised, self.encoder_of("MP+GP")),
                    3,
                )
            )
        for v in cfg.variants:
            out.append(
                Step(
                    f"finetune/{v}",
                    root / "finetune" / _variant_dir(v),
                    lambda v=v: self._finetune(v),
                    2,
                )
            )
        for v in cfg.variants:
            out.append(
                Step(
                    f"evaluate/{v}",
                    root / "evaluate" / _variant_dir(v),
                    lambda v=v: self._evaluate(v),
                    0.3,
                )
            )
        if cfg.cka.enabled:
            out.append(Step("cka", root / "cka", self._cka, 0.3))
        out.append(Step("report", root / "report", self._report, 0.2))
        return out

    # -- step bodies -------------------------------------------------------------------------

    def _finetune(self, variant: str) -> dict[str, Any]:
        init = self.encoder_of(variant)
        _need(init, f"the {variant} pre-trained encoder", variant)
        folder = self.root / "finetune" / _variant_dir(variant)
        overrides = [*self.cfg.finetune.overrides, f"run_dir={folder}", f"init={init}"]
        recipe = self.recipe(self.cfg.finetune.recipe, "finetune")
        return run_stage("finetune", recipe, overrides, self.command)

    def _train_teacher(self) -> dict[str, Any]:
        t = self.cfg.teacher
        overrides = [*t.overrides, f"run_dir={self.root / 'teacher'}"]
        return run_stage("finetune", self.recipe(t.recipe, "teacher"), overrides, self.command)

    def teacher_spec(self) -> str:
        t = self.cfg.teacher
        if t.kind == "train":
            return f"mesadepth:{_need(self.root / 'teacher' / 'model.safetensors', 'the demo teacher', 'teacher')}"
        if not t.spec:
            raise ConfigError(
                "teacher.spec is empty: give leres:<backbone>:<weights>, hf:<folder>, "
                "files:<folder> or mesadepth:<model.safetensors> (or teacher.kind=none when the "
                "video already holds pseudo-depth)"
            )
        return t.spec

    def _pseudo_depth(self) -> dict[str, Any]:
        t = self.cfg.teacher
        if not t.data:
            raise ConfigError("teacher.data is empty: the video root that receives pseudo-depth")
        summary = write_pseudo_depth(self.teacher_spec(), t.data, t.batch_size, t.device)
        quality = self._pseudo_depth_quality(t.data)
        atomic_write_text(
            self.root / "pseudo_depth" / "quality.json", json.dumps(_plain(quality), indent=2)
        )
        val = quality.get("val") or quality.get("train")
        if val:
            summary["pseudo_depth_abs_rel"] = val["pseudo_depth"]["abs_rel"]
            summary["constant_depth_abs_rel"] = val["constant_depth"]["abs_rel"]
        return summary

    def _pseudo_depth_quality(self, data: str) -> dict[str, Any]:
        """The teacher's pseudo-depth against the video's ground truth, with the supervised
        recipe's own validation settings (so the figure compares with the stage's AbsRel)."""
        from mesadepth.evaluation.pseudo_depth import pseudo_depth_quality
        from mesadepth.stages.video import VideoRecipe

        sp = self.cfg.supervised
        recipe = load_config(
            VideoRecipe, self.recipe(sp.recipe, "supervised"), ["version=v3", *sp.overrides]
        )
        v = recipe.validation
        return pseudo_depth_quality(
            data,
            folder=recipe.data.pseudo_depth,
            min_depth=v.min_depth,
            max_depth=v.max_depth,
            crop=None if v.crop == "none" else v.crop,
        )

    def _evaluate(self, variant: str) -> dict[str, Any]:
        ev = self.cfg.evaluate
        folder = self.root / "evaluate" / _variant_dir(variant)
        model = _need(self.finetuned(variant), f"the fine-tuned {variant} model", "finetune")
        results: dict[str, Any] = {}
        for dataset, data in (("nyu", ev.nyu), ("ibims", ev.ibims)):
            if data:
                results[dataset] = evaluate_model(
                    model,
                    dataset,
                    data,
                    folder / f"{dataset}.json",
                    ev.flip,
                    ev.shift_window,
                    ev.device,
                    ev.ibims_scaled_planes,
                    ev.ibims_dbe_input,
                )
        return {k: v["mean"] for k, v in results.items()}

    def _cka(self) -> dict[str, Any]:
        from mesadepth.analysis.cka import run_cka
        from mesadepth.config import parse_overrides

        c = self.cfg.cka
        data = c.data or self.cfg.evaluate.nyu
        if not data:
            raise ConfigError("cka.data is empty and there is no evaluate.nyu to fall back on")
        encoders, names, pairs = [], [], []
        for v in self.cfg.variants:
            encoders.append(self.encoder_of(v))
            names.append(v)
        for v in self.cfg.variants:
            encoders.append(self.finetuned(v))
            names.append(f"{v}-ft")
            pairs.append(f"{v}:{v}-ft")
        result, files = run_cka(
            encoders,
            data,
            c.dataset,
            self.root / "cka",
            names=names,
            pairs=pairs,
            batch_size=c.batch_size,
            max_images=c.max_images,
            device=c.device,
            encoder_overrides=dict(parse_overrides(c.encoder_overrides)) or None,
            progress=True,
        )
        return {"files": sorted(str(p) for p in files.values())}

    def _report(self) -> dict[str, Any]:
        from mesadepth.report import write_report

        path = write_report(
            self.root,
            self.cfg.variants,
            {v: self.finetuned(v) for v in self.cfg.variants},
            self.cfg.evaluate.nyu,
            notes=self.cfg.report.notes,
            previews=self.cfg.report.previews,
            device=_device(self.cfg.evaluate.device),
        )
        return {"report": str(path)}


# ----------------------------------------------------------------------------- step adapters


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# stage kind -> (module, recipe class, run function, fixed overrides)
_STAGES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "masked": ("mesadepth.stages.masked", "MaskedRecipe", "run_masked", ()),
    "geometric": ("mesadepth.stages.video", "VideoRecipe", "run_video", ("version=v2",)),
    "supervised": ("mesadepth.stages.video", "VideoRecipe", "run_video", ("version=v3",)),
    "finetune": ("mesadepth.stages.finetune", "FinetuneRecipe", "run_finetune", ()),
}


def run_stage(
    kind: str, recipe: Path, overrides: Sequence[str], command: list[str] | None
) -> dict[str, Any]:
    """Load a stage's recipe with ``overrides`` and run it (resuming from its last.ckpt)."""
    import importlib

    module_name, cls_name, fn_name, fixed = _STAGES[kind]
    module = importlib.import_module(module_name)
    cfg = load_config(getattr(module, cls_name), recipe, [*fixed, *overrides])
    metrics = getattr(module, fn_name)(cfg, command=command, resume="auto")
    return {k: v for k, v in (metrics or {}).items() if not isinstance(v, (dict, list))}


def write_pseudo_depth(spec: str, data: str, batch_size: int, device: str) -> dict[str, Any]:
    """``mesadepth pseudo-depth --teacher spec --data data`` (finished frames are kept)."""
    from mesadepth.teachers import build_teacher, write_pseudo_depth_tree

    teacher = build_teacher(spec, device=_device(device))
    return write_pseudo_depth_tree(teacher, data, batch_size=batch_size)


def evaluate_model(
    model_path: Path,
    dataset: str,
    data: str,
    out: Path,
    flip: bool = True,
    shift_window: bool = True,
    device: str = "auto",
    ibims_scaled_planes: bool = False,
    ibims_dbe_input: str = "official",
) -> dict[str, Any]:
    """Evaluate a fine-tuned ``model.safetensors`` under the ``dataset`` protocol into ``out``."""
    from mesadepth.evaluation.evaluate import (
        evaluate,
        ibims_samples,
        model_predictor,
        nyu_samples,
        write_results,
    )
    from mesadepth.models.depth_head import load_depth_model

    predict = model_predictor(
        load_depth_model(model_path), device=_device(device), flip=flip, shift_window=shift_window
    )
    root = Path(data)
    if dataset == "nyu":
        samples = nyu_samples(root / "nyu_depth_v2_labeled.mat", root / "splits.mat")
    else:
        samples = ibims_samples(root)
    results = evaluate(
        dataset,
        samples,
        lambda s, i: predict(s.image),
        ibims_scaled_planes=ibims_scaled_planes,
        ibims_dbe_input=ibims_dbe_input,
    )
    write_results(results, out)
    return results


def plan(cfg: PipelineConfig, config_path: str | os.PathLike[str] | None = None) -> list[Step]:
    """The steps ``cfg`` would run, in order (finished ones included)."""
    base = Path(config_path).parent if config_path else None
    return _Chain(resolve(cfg), None, base).steps()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_pipeline(
    cfg: PipelineConfig,
    config_path: str | os.PathLike[str] | None = None,
    command: list[str] | None = None,
    print_fn: Callable[[str], None] = print,
    stop_after: str | None = None,
) -> dict[str, Any]:
    """Run every unfinished step of ``cfg``; returns {step: its summary}.

    One line per step with elapsed time and a remaining-time estimate (from the measured pace
    of the steps run so far, weighted by each step's ``cost``); each stage also shows its own
    progress bar. A failing step writes its traceback to ``<step>/error.log`` and raises
    :class:`PipelineStepError` naming the step, the log and the command that resumes.
    ``stop_after`` ends the run after the named step (tests use it to simulate an interruption).
    """
    cfg = resolve(cfg)
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml", command=command)
    chain = _Chain(cfg, command, Path(config_path).parent if config_path else None)
    steps = chain.steps()
    todo = [s for s in steps if not s.is_done()]
    total_cost = sum(s.cost for s in todo) or 1.0
    resume_cmd = "mesadepth pipeline --config " + (
        str(config_path) if config_path else str(root / "config.yaml")
    )
    summaries: dict[str, Any] = {}
    t_start = time.perf_counter()
    spent_cost = 0.0
    n = len(steps)
    for i, step in enumerate(steps, start=1):
        if step.is_done():
            summaries[step.name] = json.loads(step.done_file.read_text()).get("summary", {})
            print_fn(f"[{i}/{n}] {step.name}: done earlier, skipped")
            continue
        elapsed = time.perf_counter() - t_start
        remaining = elapsed / spent_cost * (total_cost - spent_cost) if spent_cost > 0 else math.nan
        print_fn(
            f"[{i}/{n}] {step.name}: running (elapsed {_clock(elapsed)}, "
            f"remaining ~{_clock(remaining)})"
        )
        step.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            summary = step.run() or {}
        except KeyboardInterrupt:
            print_fn(f"[{i}/{n}] {step.name}: interrupted; resume with `{resume_cmd}`")
            raise
        except Exception as exc:
            log = step.folder / "error.log"
            atomic_write_text(log, "".join(traceback.format_exception(exc)))
            raise PipelineStepError(
                f"step {step.name!r} failed: {exc}\n  log: {log}\n  fix the cause and run "
                f"`{resume_cmd}` again: finished steps are skipped and this one resumes"
            ) from exc
        seconds = time.perf_counter() - t0
        spent_cost += step.cost
        summaries[step.name] = summary
        atomic_write_text(
            step.done_file,
            json.dumps({"seconds": round(seconds, 2), "summary": _plain(summary)}, indent=2),
        )
        print_fn(f"[{i}/{n}] {step.name}: finished in {_clock(seconds)}")
        if stop_after == step.name:
            break
    else:
        print_fn(
            f"pipeline finished in {_clock(time.perf_counter() - t_start)}; report: "
            f"{root / 'report.md'}"
        )
    sys.stdout.flush()
    return summaries


def _plain(value: Any) -> Any:
    """JSON-safe copy (NaN -> None, numpy scalars -> numbers, paths -> strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, int):
        return value
    return f if math.isfinite(f) else None


def load_pipeline_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> PipelineConfig:
    """The pipeline recipe at ``path`` with ``key=value`` overrides."""
    return load_config(PipelineConfig, path, overrides)
