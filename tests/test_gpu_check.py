"""benchmarks/gpu_check.py: its --smoke run (every row, 2 steps, CPU) and its measuring helpers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (its sibling imports need benchmarks/ on sys.path)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses resolve annotations through it
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def smoke(gpu_check, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "check.json"
    threads = torch.get_num_threads()  # tiny models: one thread is faster, and no spin-waits
    try:
        argv = ["--smoke", "--threads", "1", "--out", str(out), "--work", str(tmp / "work")]
        returned = gpu_check.main(argv)
    finally:
        torch.set_num_threads(threads)
    written = json.loads(out.read_text())
    return returned, written, {r["row"]: r for r in written["rows"]}


def _positive(row: dict, *keys: str) -> None:
    for k in keys:
        v = row[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (row["row"], k, v)


def _close(a: float, b: float, rel: float = 2e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel)  # the JSON keeps 4 significant digits


STAGE_ROWS = ["MP 64", "GP 64", "SP 64", "FT 64"]
EV_ROW = "EV 64 (flip+2 win)"


@pytest.mark.slow
def test_smoke_writes_every_row_with_consistent_numbers(smoke):
    returned, written, rows = smoke
    assert returned["rows"] == written["rows"]  # the JSON on disk is the final report
    meta = written["meta"]
    assert meta["device"] == "cpu" and meta["world"]["counts"]["video_train_scenes"] == 2
    expected = {*STAGE_ROWS, "GP 64 bf16", "SP 64 bf16", "FT 64 bf16", EV_ROW, EV_ROW + " bf16"}
    assert expected <= set(rows)
    assert not [r for r in written["rows"] if "error" in r]
    peak = meta["peak_tflops"] * 1e12
    for name in [n for n in expected if not n.startswith("EV")]:
        r = rows[name]
        _positive(r, "img_s", "step_ms", "data_ms", "fwd_ms", "bwd_ms", "opt_ms", "peak_GiB")
        _positive(r, "TFLOP", "MFU", "exp_GiB", "exp_img_s", "params_M")
        assert math.isfinite(r["loss"])
        phases = r["data_ms"] + r["fwd_ms"] + r["bwd_ms"] + r["opt_ms"]
        assert _close(phases, r["step_ms"])
        assert _close(r["img_s"], r["batch"] / (r["step_ms"] / 1e3))
        assert _close(r["MFU"], r["TFLOP"] * 1e12 / (r["step_ms"] / 1e3) / peak)
        chip = peak if r["precision"] == "bf16" else meta["fp32_peak_tflops"] * 1e12
        assert _close(r["exp_img_s"], 0.4 * chip / (r["TFLOP"] * 1e12 / r["batch"]))
        # Weights, gradients and Adam's moments alone: 16 bytes per trainable parameter.
        assert r["exp_GiB"] > 16 * r["params_M"] * 1e6 / 2**30 * 0.99
    for name in STAGE_ROWS:  # the search: no OOM on a CPU, so it stops at the smoke cap (2x)
        r = rows[name]
        assert r["precision"] == ("bf16" if name.startswith("MP") else "fp32")
        assert (r["max_batch"], r["stop"]) == (2 * r["batch"], "cap")
        _positive(r, "max_img_s", "max_GiB")
        # bf16 autocast changes the speed, never the FLOPs counted.
        if name != "MP 64":
            assert rows[name + " bf16"]["TFLOP"] == r["TFLOP"]
    for name in (EV_ROW, EV_ROW + " bf16"):
        r = rows[name]
        _positive(r, "img_s", "step_ms", "data_ms", "fwd_ms", "TFLOP", "MFU", "exp_GiB")
        assert "bwd_ms" not in r and r["batch"] == 1
        assert _close(r["data_ms"] + r["fwd_ms"], r["step_ms"], rel=1e-2)
    assert rows[EV_ROW]["TFLOP"] == rows[EV_ROW + " bf16"]["TFLOP"]


@pytest.mark.slow
def test_smoke_gp_learn_rows(smoke):
    _, _, rows = smoke
    r = rows["GP-learn posenet"]
    assert r["steps"] == 2
    _positive(r, "abs_rel_start", "abs_rel_end", "abs_rel_const", "snippets_s", "photo_start")
    assert _close(r["end_vs_const"], r["abs_rel_end"] / r["abs_rel_const"])
    for k in ("pose_t_cos_start", "pose_t_cos", "pose_pair_cos"):
        assert -1.0 <= r[k] <= 1.0
    assert r["pose_rot_err_deg"] >= 0 and r["pose_rot_none_deg"] > 0
    assert 0.0 <= r["data_wait_share"] < 1.0
    assert r["curve"][-1]["step"] == 2 and _close(r["curve"][-1]["abs_rel"], r["abs_rel_end"])
    from mesadepth.stages.video import PoseConfig

    poses = rows["GP-learn poses"]
    if "source" in {f.name for f in dataclasses.fields(PoseConfig)}:
        assert poses["steps"] == 2 and poses["abs_rel_end"] > 0
    else:
        assert "skipped" in poses["note"] and "steps" not in poses


def test_search_stops_at_oom_and_keeps_the_largest_fit(gpu_check):
    calls = []

    def trial(n: int):
        calls.append(n)
        return None if n > 12 else (10.0 * n, n / 4, 0.0)

    res = gpu_check.search(trial, 3, 16, 60.0)
    assert calls == [6, 12, 24]
    assert res == {"max_batch": 12, "max_img_s": 120.0, "max_GiB": 3.0, "stop": "oom"}
    assert gpu_check.search(trial, 3, 4, 60.0)["stop"] == "cap"
    assert gpu_check.search(lambda n: None, 5, 4, 60.0) == {"max_batch": 5, "stop": "oom"}


def test_try_batch_turns_out_of_memory_into_none(gpu_check):
    model = torch.nn.Linear(3, 1)

    def loss(b: dict) -> torch.Tensor:
        if b["x"].shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("simulated")
        return model(b["x"]).sum()

    st = gpu_check.Stage(
        "toy", "fp32", 2, model, lambda n: {"x": torch.ones(n, 3)}, loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
    )  # fmt: skip
    assert gpu_check.try_batch(st, 8, "cpu", "fp32") is None
    assert all(p.grad is None for p in model.parameters())
    img_s, _, step_s = gpu_check.try_batch(st, 4, "cpu", "fp32")
    assert img_s == pytest.approx(4 / step_s)


def test_saved_bytes_counts_activations_not_parameters(gpu_check):
    lin = torch.nn.Linear(5, 7, bias=False)
    x = torch.randn(3, 5, requires_grad=False)
    with gpu_check.saved_bytes(lin) as seen:
        torch.tanh(lin(x)).sum()
    # linear saves its input (3 x 5) and weight (a parameter: not counted); tanh its output.
    assert sorted(seen.values()) == [3 * 5 * 4, 3 * 7 * 4]


def test_measure_train_halves_a_recipe_batch_that_does_not_fit(gpu_check):
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 1)

    def loss(b: dict) -> torch.Tensor:
        if b["x"].shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("simulated")
        return model(b["x"]).pow(2).sum()

    st = gpu_check.Stage(
        "toy", "fp32", 16, model, lambda n: {"x": torch.ones(n, 3)}, loss,
        torch.optim.Adam(model.parameters(), lr=0.1),
    )  # fmt: skip
    args = SimpleNamespace(batch=None, steps=2, search_cap=4, peak_tflops=1.0, fp32_peak_tflops=1.0)
    row = gpu_check.measure_train(st, "fp32", args, "cpu", search_s=60.0)
    assert (row["batch"], row["recipe_batch"], row["max_batch"], row["stop"]) == (4, 16, 4, "oom")
    assert "16: out of memory" in row["note"]
    # Linear 3 -> 1 on 4 rows: 2 x 4 x 3 FLOPs forward, as many for the weight's gradient (the
    # input needs none).
    assert row["TFLOP"] * 1e12 == pytest.approx(2 * 2 * 4 * 3)
