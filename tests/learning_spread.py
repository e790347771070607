"""Runs the learning checks (``pytest -m learning``) for every seed x torch thread count, one
configuration after the other, and prints the spread of the quantities they assert on.

    python tests/learning_spread.py --out /tmp/learn-checks            # seeds 0-2 x threads 1, 2
    python tests/learning_spread.py --out /tmp/learn-checks --table    # the table of a past run

Each configuration appends to ``<out>/values.jsonl`` (see ``MESADEPTH_TEST_RECORD`` in
``tests/conftest.py``); the table has one row per asserted quantity (its bound in the name) and
one column per ``s<seed>/t<threads>``. Extra arguments go to pytest (e.g. ``-k supervised``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, seeds: list[int], threads: list[int], pytest_args: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = out / "values.jsonl"
    record.unlink(missing_ok=True)
    for seed in seeds:
        for n in threads:
            env = {
                # Idle OpenMP threads sleep instead of spinning: no effect on the numbers (the
                # thread count sets the float order), a large one on a shared machine's speed.
                "OMP_WAIT_POLICY": "PASSIVE",
                **os.environ,
                "MESADEPTH_TEST_SEED": str(seed),
                "MESADEPTH_TEST_THREADS": str(n),
                "MESADEPTH_TEST_RECORD": str(record),
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            }
            cmd = [sys.executable, "-m", "pytest", "-q", "-m", "learning", "-p", "no:cacheprovider"]
            log = out / f"s{seed}_t{n}.log"
            t0 = time.perf_counter()
            with log.open("w") as f:
                code = subprocess.run(
                    [*cmd, *pytest_args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
                ).returncode
            summary = (log.read_text().strip().splitlines() or [""])[-1]
            print(
                f"seed {seed}, {n} thread(s): {summary} ({time.perf_counter() - t0:.0f} s wall, "
                f"exit {code}, log {log})",
                flush=True,
            )


def table(record: Path) -> str:
    rows = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    configs = sorted({(r["env_seed"], r["threads"]) for r in rows})
    lines = [
        "| test | quantity | " + " | ".join(f"s{s}/t{t}" for s, t in configs) + " | min | max |",
        "|---|---|" + "---|" * (len(configs) + 2),
    ]
    by_test: dict[str, dict] = {}
    for r in rows:
        by_test.setdefault(r["test"], {})[(r["env_seed"], r["threads"])] = r
    for test, runs in by_test.items():
        name = test.split("::")[-1]
        failed = [f"s{s}/t{t}" for (s, t), r in sorted(runs.items()) if r["outcome"] != "passed"]
        quantities = list(dict.fromkeys(k for r in runs.values() for k in r["values"]))
        for i, q in enumerate(quantities):
            vals = [runs.get(c, {}).get("values", {}).get(q) for c in configs]
            nums = [v for v in vals if isinstance(v, (int, float))]
            cells = ["" if v is None else f"{v:.4g}" for v in vals]
            label = (
                f"{name}" + (f" (FAILED: {', '.join(failed)})" if failed else "") if i == 0 else ""
            )
            span = [f"{min(nums):.4g}", f"{max(nums):.4g}"] if nums else ["", ""]
            lines.append(f"| {label} | {q} | " + " | ".join(cells + span) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for values.jsonl")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--table", action="store_true", help="only print the table of <out>/values.jsonl"
    )
    args, pytest_args = p.parse_known_args()
    if not args.table:
        run(args.out, args.seeds, args.threads, pytest_args)
    print(table(args.out / "values.jsonl"))


if __name__ == "__main__":
    main()
