"""Pieces every benchmark script shares: peak memory, one process per row, the table.

The scripts are run as ``python benchmarks/<name>.py``, so this module is imported by its bare
name (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

OOM = "killed by SIGKILL (out of memory: the kernel's OOM killer)"


def maxrss_mb() -> float:
    """This process's peak resident set so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def row_in_subprocess(script: str, name: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``script --only name --json *args`` in a fresh Python and return its last JSON line.

    A fresh process per row keeps the peak-memory column that row's alone. A failed row comes
    back as ``{"config": name, "error": ...}`` (the last line of its output, or the OOM killer)
    so one row running out of memory does not lose the others.
    """
    cmd = [sys.executable, script, "--only", name, "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
        why = OOM if out.returncode == -9 else (tail[0] if tail else f"exit {out.returncode}")
        return {"config": name, "error": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: Iterable[Mapping[str, Any]]) -> None:
    """A markdown table with every key any row has, in first-seen order."""
    rows = list(rows)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
