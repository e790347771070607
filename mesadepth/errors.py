"""Errors that name the offending file and what was expected, and the skip-and-count policy."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class MesaError(Exception):
    """Base class of every error mesadepth raises on purpose."""


class DataError(MesaError, ValueError):
    """A file or folder is missing, unreadable or not in the expected format.

    The message always starts with the path and says what was expected, e.g.
    ``/data/nyu/kitchen_0028b/cam.txt: expected 9 numbers (a 3x3 intrinsics matrix), found 6``.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MesaError, ValueError):
    """A recipe or a command-line override is invalid."""


class MissingFileError(DataError, FileNotFoundError):
    """A required file does not exist; the message says what it should contain."""

    def __init__(self, path: str | os.PathLike[str], what: str, hint: str = "") -> None:
        msg = f"missing {what}"
        if hint:
            msg += f" ({hint})"
        super().__init__(path, msg)


@dataclass
class BadSamples:
    """Skip-and-count policy for corrupt samples in a large dataset.

    ``on_error="raise"`` (the default everywhere) re-raises the first :class:`DataError`;
    ``on_error="skip"`` counts it per reason and lets the dataset move on. A dataset that
    skips reports the counts through :meth:`summary`; a DataLoader worker holds its own
    copy, so counts are per process.
    """

    on_error: str = "raise"
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    known_bad: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def handle(self, err: DataError) -> None:
        """Raise ``err`` or record it, according to the policy."""
        if self.on_error == "raise":
            raise err
        reason = err.problem.split(":")[0][:80]
        self.counts[reason] += 1
        self.examples.setdefault(reason, err.path)

    def load(
        self, index: int, n: int, load: Callable[[int], T], where: str | os.PathLike[str]
    ) -> T:
        """``load(index)``, or under ``on_error="skip"`` the next loadable item (wrapping).

        The substitute is deterministic (the next index), and an item that failed once is
        remembered and not decoded again. ``where`` names the dataset in the error raised
        when no item at all can be read.
        """
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range [0, {n})")
        for step in range(n):
            j = (index + step) % n
            if j in self.known_bad:
                continue
            try:
                return load(j)
            except DataError as err:
                self.handle(err)  # re-raises unless on_error == "skip"
                self.known_bad.add(j)
        raise DataError(where, f"no readable item left; {self.summary()}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no sample skipped"
        parts = [
            f"{n} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.counts.items()
        ]
        return f"skipped {self.total} sample(s): " + "; ".join(parts)
