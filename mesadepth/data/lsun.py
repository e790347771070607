"""LSUN scene categories: LMDB environments, the official folder export, and a folder fallback.

Spec: datasets-and-ibims-evaluation.md section 1 (LSUN) and pitfalls 23-26.

On disk a category/split is a directory ``<category>_<split>_lmdb/`` holding exactly ``data.mdb``
and ``lock.mdb``; keys are the ASCII bytes of 40-hex ids, values are whole compressed image
files (JPEG or WebP; always decoded by content). Items follow the sample-dict convention of
:mod:`mesadepth.data`: ``{"image", "category", "label", "key", "index"}``.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from torch.utils.data import Dataset

from mesadepth.errors import BadSamples, ConfigError, DataError, MissingFileError
from mesadepth.io import (
    PathLike,
    atomic_write_bytes,
    atomic_write_text,
    decode_rgb,
    encode_jpeg,
    encode_webp,
    read_list_file,
)

__all__ = [
    "MESA_CATEGORIES",
    "ImageFolderDataset",
    "LSUNLmdb",
    "close_lmdb_envs",
    "draw_subset",
    "export_lsun_folder",
    "lsun_key",
    "open_lmdb_readonly",
    "selection_file_name",
    "write_lsun_lmdb",
]

#: The four LSUN scene categories MeSa pre-trains on (spec 1.1), in MeSa's order.
MESA_CATEGORIES: tuple[str, ...] = ("bedroom", "dining_room", "kitchen", "living_room")

_MIN_MAP_SIZE = 64 << 20  # spec 1.7: LMDB's default 10 MiB map fills after a few images
_IMAGE_ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "jpeg": encode_jpeg,
    "webp": encode_webp,
}
# Keys become file names and lines of text files, so they must be plain printable ASCII.
_KEY_RE = re.compile(rb"[\x21-\x7e]+")

# One read-only handle per (process, environment directory). py-lmdb refuses to open the same
# environment twice in a process, and a handle must never be used across fork (spec 1.3 / 6.25).
_ENVS: dict[tuple[int, str], lmdb.Environment] = {}
_ENVS_LOCK = threading.Lock()  # two threads opening one path at once would trip py-lmdb's guard


def _reset_lock_in_child() -> None:
    # A lock held by another parent thread at fork time would stay locked forever in the child.
    global _ENVS_LOCK
    _ENVS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def lsun_key(seed_text: str) -> bytes:
    """A 40-hex lowercase key (SHA-1 of ``seed_text``) as ASCII bytes, like LSUN ids (spec 1.2)."""
    return hashlib.sha1(seed_text.encode("utf-8")).hexdigest().encode("ascii")


def _env_path(lmdb_dir: PathLike) -> str:
    return os.path.realpath(os.fspath(lmdb_dir))


def open_lmdb_readonly(lmdb_dir: PathLike) -> lmdb.Environment:
    """This process's shared read-only handle on the environment directory ``lmdb_dir`` (spec 1.3).

    Opened lazily with ``lock=False, readahead=False, meminit=False``. A handle inherited from the
    parent through fork is closed in the child first (closing it there only unmaps the child's
    copy), because py-lmdb would otherwise refuse the re-open as "already open in this process".
    """
    path = _env_path(lmdb_dir)
    pid = os.getpid()
    env = _ENVS.get((pid, path))
    if env is not None:
        return env
    with _ENVS_LOCK:
        env = _ENVS.get((pid, path))
        return env if env is not None else _open_locked(lmdb_dir, path, pid)


def _open_locked(lmdb_dir: PathLike, path: str, pid: int) -> lmdb.Environment:
    for stale in [k for k in _ENVS if k[1] == path and k[0] != pid]:
        _ENVS.pop(stale).close()
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise MissingFileError(
            os.path.join(os.fspath(lmdb_dir), "data.mdb"), "LMDB data file (directory-mode env)"
        )
    try:
        env = lmdb.open(
            path,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=16,
            subdir=True,
        )
    except lmdb.Error as exc:
        hint = " (opened elsewhere in this process?)" if "already open" in str(exc) else ""
        raise DataError(lmdb_dir, f"cannot open as a read-only LMDB env{hint}: {exc}") from exc
    _ENVS[(pid, path)] = env
    return env


def close_lmdb_envs(lmdb_dir: PathLike | None = None) -> None:
    """Close this process's cached handles (all, or the one for ``lmdb_dir``).

    Needed before something else in this process opens the same environment (a writer, or
    torchvision's ``LSUN``), since py-lmdb allows one open handle per environment per process.
    """
    pid = os.getpid()
    path = None if lmdb_dir is None else _env_path(lmdb_dir)
    for key in [k for k in _ENVS if k[0] == pid and (path is None or k[1] == path)]:
        _ENVS.pop(key).close()


def write_lsun_lmdb(
    root: PathLike,
    category: str,
    images: Sequence[np.ndarray],
    split: str = "train",
    formats: Sequence[str] = ("jpeg", "webp"),
    seed: int = 0,
    quality: int = 75,
) -> list[str]:
    """Create ``<root>/<category>_<split>_lmdb/`` in LSUN's format (spec 1.2, fixture 1.7).

    Image ``i`` is stored under ``lsun_key(f"{category}/{split}/{seed}/{i}")`` as a whole
    compressed file in ``formats[i % len(formats)]``, so JPEG and WebP values alternate (both
    occur in the wild). The environment is built in a hidden temporary directory and renamed into
    place, so it holds exactly ``data.mdb`` and ``lock.mdb``. Returns the keys in image order.
    """
    if not images:
        raise ValueError("write_lsun_lmdb: no images given")
    bad = [f for f in formats if f not in _IMAGE_ENCODERS]
    if not formats or bad:
        raise ValueError(
            f"write_lsun_lmdb: formats must be from {sorted(_IMAGE_ENCODERS)}, got {formats}"
        )
    root = Path(root)
    final = root / f"{category}_{split}_lmdb"
    if final.exists():
        raise FileExistsError(
            f"{final}: already exists; write_lsun_lmdb only creates new environments"
        )
    keys: list[bytes] = []
    values: list[bytes] = []
    for i, rgb in enumerate(images):
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(
                f"write_lsun_lmdb: image {i} must be (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}"
            )
        keys.append(lsun_key(f"{category}/{split}/{seed}/{i}"))
        values.append(_IMAGE_ENCODERS[formats[i % len(formats)]](rgb, quality))
    if len(set(keys)) != len(keys):
        raise ValueError("write_lsun_lmdb: duplicate keys")  # cannot happen with distinct indices

    # B-tree pages and free lists need head-room beyond the raw value bytes.
    map_size = max(_MIN_MAP_SIZE, -(-(2 * sum(map(len, values)) + (1 << 20)) // (1 << 20)) << 20)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the real downloads are world-readable
        env = lmdb.open(os.fspath(tmp), map_size=map_size, subdir=True, max_dbs=0)
        try:
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for k, v in zip(keys, values, strict=True):
                            txn.put(k, v, overwrite=False)
                    break
                except lmdb.MapFullError:
                    map_size *= 2  # grow and redo the (aborted) transaction
                    env.set_mapsize(map_size)
        finally:
            env.close()
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()
    return [k.decode("ascii") for k in keys]


def _check_key(key: bytes, where: str) -> str:
    if not _KEY_RE.fullmatch(key):
        raise DataError(
            where, f"expected printable ASCII keys (40-hex LSUN ids), found {key[:60]!r}"
        )
    return key.decode("ascii")


def export_lsun_folder(lmdb_dir: PathLike, out_dir: PathLike, flat: bool = False) -> int:
    """Write every value byte-for-byte as the official exporter does (spec 1.5); return the count.

    Nested: ``<out>/<k0>/<k1>/<k2>/<k3>/<k4>/<k5>/<key>.webp`` (first six key characters, one
    directory level each); ``flat``: ``<out>/<key>.webp``. The ``.webp`` extension is used
    whatever the content is, exactly like the exporter (pitfall 23).
    """
    lmdb_dir = Path(lmdb_dir)
    out_dir = Path(out_dir)
    env = open_lmdb_readonly(lmdb_dir)
    count = 0
    with env.begin(buffers=False) as txn:
        for raw_key, value in txn.cursor():
            key = _check_key(raw_key, os.fspath(lmdb_dir))
            if flat:
                target = out_dir / f"{key}.webp"
            else:
                if len(key) < 6:
                    raise DataError(
                        f"{lmdb_dir}:{key}", "key shorter than 6 characters for the nested layout"
                    )
                target = out_dir.joinpath(*key[:6], f"{key}.webp")
            atomic_write_bytes(target, value)
            count += 1
    return count


def draw_subset(sorted_keys: Sequence[Any], cap: int, seed: int) -> np.ndarray:
    """Positions of ``cap`` keys drawn uniformly without replacement, in ascending order (spec 1.6).

    The rule (the paper gives none, pitfall 26): ``np.random.default_rng(seed).choice(n, cap,
    replace=False)`` on the bytewise-sorted key list, then sorted so reads follow LMDB order.
    """
    n = len(sorted_keys)
    if cap > n:
        raise ValueError(f"cannot draw {cap} keys from {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=cap, replace=False))


def selection_file_name(category: str, n: int) -> str:
    """``lsun_<category>_<N>.txt``; N written as ``300k`` for whole thousands (spec 1.6)."""
    tag = f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)
    return f"lsun_{category}_{tag}.txt"


def _enumerate_keys(env: lmdb.Environment) -> list[bytes]:
    # Keys-only cursor walk: values are never paged in (minutes for 3M keys rather than hours).
    with env.begin(buffers=False) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def _as_key_array(keys: Sequence[bytes]) -> np.ndarray:
    # A fixed-width bytes array instead of a list of Python objects: ~40 B per key, and no
    # per-object reference counts for forked DataLoader workers to copy page by page.
    width = max((len(k) for k in keys), default=1)
    return np.array(keys, dtype=f"S{width}")


class _SkippingDataset(Dataset):
    """Shared item logic: load, skip-and-count corrupt items (next valid index), transform."""

    transform: Callable[[dict[str, Any]], Any] | None
    bad: BadSamples
    _where: str

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        sample = self.bad.load(index % n, n, self._load, self._where)
        return self.transform(sample) if self.transform is not None else sample


class LSUNLmdb(_SkippingDataset):
    """LSUN categories read straight from their LMDB environments (spec 1.2-1.6).

    ``<root>/<category>_<split>_lmdb`` per category; ``label`` is the position of the category in
    ``categories`` (like torchvision, not the LSUN index). Keys are enumerated once per category
    with a keys-only cursor and cached as text (one key per line) in ``key_cache_dir`` if given;
    a cache whose length differs from the environment's entry count is rebuilt. Never caches in
    the working directory (pitfall 24).

    ``cap_per_category`` draws that many keys per category with :func:`draw_subset` and ``seed``;
    ``key_lists={category: path}`` trains from saved selections instead (if ``cap_per_category``
    is also given it must equal each list's length). :meth:`save_selection` writes the keys in use.
    Handles are opened lazily per process (:func:`open_lmdb_readonly`).
    """

    def __init__(
        self,
        root: PathLike,
        categories: Sequence[str] = MESA_CATEGORIES,
        split: str = "train",
        cap_per_category: int | None = None,
        seed: int = 0,
        key_cache_dir: PathLike | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        on_error: str = "raise",
        key_lists: Mapping[str, PathLike] | None = None,
    ) -> None:
        if isinstance(categories, str):
            categories = (categories,)  # a bare string would iterate per character
        self.categories = tuple(categories)
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ConfigError(
                f"LSUNLmdb: categories must be non-empty and distinct, got {self.categories}"
            )
        if cap_per_category is not None and (
            not isinstance(cap_per_category, int | np.integer) or cap_per_category < 1
        ):
            raise ConfigError(
                f"LSUNLmdb: cap_per_category must be a positive int, got {cap_per_category!r}"
            )
        key_lists = dict(key_lists or {})
        unknown = sorted(set(key_lists) - set(self.categories))
        if unknown:
            raise ConfigError(f"LSUNLmdb: key_lists for categories not requested: {unknown}")
        self.root = Path(root)
        self.split = split
        self.cap_per_category = cap_per_category
        self.seed = seed
        self.key_cache_dir = None if key_cache_dir is None else Path(key_cache_dir)
        self.transform = transform
        self.bad = BadSamples(on_error)
        self._where = os.fspath(self.root)
        if not self.root.is_dir():
            raise MissingFileError(
                self.root, "LSUN root directory holding <category>_<split>_lmdb folders"
            )

        self.lmdb_dirs: dict[str, Path] = {}
        self._keys: dict[str, np.ndarray] = {}
        for cat in self.categories:
            lmdb_dir = self.root / f"{cat}_{split}_lmdb"
            if not (lmdb_dir / "data.mdb").is_file():
                found = sorted(p.name for p in self.root.iterdir())
                shown = ", ".join(found[:20]) + (" ..." if len(found) > 20 else "") or "nothing"
                raise MissingFileError(
                    lmdb_dir,
                    f"LSUN LMDB directory (with data.mdb) for category {cat!r}, split {split!r}",
                    hint=f"found under {self.root}: {shown}",
                )
            self.lmdb_dirs[cat] = lmdb_dir
            if cat in key_lists:
                keys = self._read_key_list(key_lists[cat])
            else:
                keys = self._all_keys(cat)
                if cap_per_category is not None:
                    if cap_per_category > len(keys):
                        raise DataError(
                            lmdb_dir,
                            f"holds {len(keys)} entries, fewer than cap_per_category="
                            f"{cap_per_category} (spec 1.6 draws without replacement)",
                        )
                    keys = keys[draw_subset(keys, cap_per_category, seed)]
            self._keys[cat] = keys
        sizes = [len(self._keys[c]) for c in self.categories]
        self._ends = np.cumsum(sizes).tolist()  # global index runs through categories in list order

    def _read_key_list(self, path: PathLike) -> np.ndarray:
        rows = read_list_file(path, what="LSUN key list (one key per line)")
        keys = [row[0].encode("ascii") for row in rows]
        if any(len(row) != 1 for row in rows):
            raise DataError(path, "expected one key per line")
        if len(set(keys)) != len(keys):
            raise DataError(path, "key list has duplicate keys")
        if self.cap_per_category is not None and len(keys) != self.cap_per_category:
            raise ConfigError(
                f"{path}: holds {len(keys)} keys but cap_per_category={self.cap_per_category}"
            )
        return _as_key_array(sorted(keys))

    def _cache_path(self, cat: str) -> Path | None:
        if self.key_cache_dir is None:
            return None
        # The name carries a hash of the full path: two roots never share a cache (pitfall 24).
        digest = hashlib.sha1(_env_path(self.lmdb_dirs[cat]).encode("utf-8")).hexdigest()[:12]
        return self.key_cache_dir / f"lsun_keys_{cat}_{self.split}_{digest}.txt"

    def _all_keys(self, cat: str) -> np.ndarray:
        lmdb_dir = self.lmdb_dirs[cat]
        env = open_lmdb_readonly(lmdb_dir)
        entries = env.stat()["entries"]
        if entries == 0:
            raise DataError(lmdb_dir, "LMDB environment is empty; expected image entries")
        cache = self._cache_path(cat)
        if cache is not None and cache.is_file():
            try:
                lines = cache.read_text(encoding="ascii").split()
            except UnicodeDecodeError:
                lines = []  # damaged cache: rebuild it
            if len(lines) == entries:
                return _as_key_array(sorted(k.encode("ascii") for k in lines))
            # stale (the environment changed) or damaged: fall through and rebuild it
        raw = _enumerate_keys(env)
        if len(raw) != entries:
            raise DataError(
                lmdb_dir, f"cursor gave {len(raw)} keys but stat() says {entries} entries"
            )
        text_keys = [_check_key(k, os.fspath(lmdb_dir)) for k in raw]
        if cache is not None:
            atomic_write_text(cache, "\n".join(text_keys) + "\n")
        return _as_key_array(sorted(raw))

    def keys(self, category: str) -> list[str]:
        """The keys in use for ``category`` (all, capped, or from its key list), sorted."""
        return [k.decode("ascii") for k in self._keys[category].tolist()]

    def save_selection(self, out_dir: PathLike) -> dict[str, Path]:
        """Write the keys in use per category to ``<out_dir>/lsun_<category>_<N>.txt`` (1.6)."""
        out: dict[str, Path] = {}
        for cat in self.categories:
            keys = self.keys(cat)
            path = Path(out_dir) / selection_file_name(cat, len(keys))
            atomic_write_text(path, "\n".join(keys) + "\n")
            out[cat] = path
        return out

    def __len__(self) -> int:
        return self._ends[-1]

    def _load(self, index: int) -> dict[str, Any]:
        label = bisect.bisect_right(self._ends, index)
        cat = self.categories[label]
        local = index - (self._ends[label - 1] if label else 0)
        key = bytes(self._keys[cat][local])
        where = f"{self.lmdb_dirs[cat]}:{key.decode('ascii')}"
        env = open_lmdb_readonly(self.lmdb_dirs[cat])
        with env.begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise DataError(where, "key not found in the LMDB environment (stale key list?)")
        return {
            "image": decode_rgb(value, where),
            "category": cat,
            "label": label,
            "key": key.decode("ascii"),
            "index": index,
        }


class ImageFolderDataset(_SkippingDataset):
    """Plain image folders, the LSUN fallback of spec 1.5: ``<root>/<category>/**/<name>.<ext>``.

    The search is recursive, so both exporter layouts (nested and flat) and hand-made folders
    work. ``categories=None`` uses the sorted sub-folders of ``root``, or ``root`` itself (its
    name as the category) when it directly holds images. ``list_file`` (one path for all
    categories, or ``{category: path}``) restricts to the listed names (file stem, no extension);
    every listed name must be found. Order: categories as given, then sorted relative path.
    Items carry the same keys as :class:`LSUNLmdb`, ``key`` being the file stem.
    """

    def __init__(
        self,
        root: PathLike,
        categories: Sequence[str] | None = None,
        list_file: PathLike | Mapping[str, PathLike] | None = None,
        extensions: Sequence[str] = ("webp", "jpg", "jpeg", "png"),
        transform: Callable[[dict[str, Any]], Any] | None = None,
        on_error: str = "raise",
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.bad = BadSamples(on_error)
        self._where = os.fspath(self.root)
        self.extensions = tuple(e.lower().lstrip(".") for e in extensions)
        suffixes = {"." + e for e in self.extensions}
        if not self.root.is_dir():
            raise MissingFileError(self.root, "image folder")

        def is_image(name: str) -> bool:
            # Hidden files are skipped: atomic writers leave ".<name>.<rand>.tmp.webp" behind
            # when interrupted, and those must not be read as images.
            return not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes

        if isinstance(categories, str):
            categories = (categories,)
        if categories is None:
            if any(is_image(p.name) and p.is_file() for p in self.root.iterdir()):
                dirs = {self.root.name: self.root}
            else:
                subs = sorted(
                    p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                )
                dirs = {name: self.root / name for name in subs}
        else:
            dirs = {c: self.root / c for c in categories}
            for cat, d in dirs.items():
                if not d.is_dir():
                    found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                    raise MissingFileError(
                        d,
                        f"image folder for category {cat!r}",
                        hint=f"sub-folders of {self.root}: {found}",
                    )
        if not dirs:
            raise DataError(self.root, "no category sub-folder and no image directly inside")
        self.categories = tuple(dirs)

        wanted: dict[str, set[str] | None] = {cat: None for cat in self.categories}
        if isinstance(list_file, Mapping):
            unknown = sorted(set(list_file) - set(self.categories))
            if unknown:
                raise ConfigError(
                    f"ImageFolderDataset: list files for unknown categories {unknown}"
                )
            for cat, path in list_file.items():
                wanted[cat] = self._read_names(path)
        elif list_file is not None:
            names = self._read_names(list_file)
            wanted = {cat: names for cat in self.categories}

        self.paths: list[Path] = []
        self.labels: list[int] = []
        found: dict[str, set[str]] = {}  # listed names seen, per category
        for label, (cat, d) in enumerate(dirs.items()):
            files: list[tuple[str, Path]] = []
            for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
                dirnames[:] = [n for n in dirnames if not n.startswith(".")]
                for name in filenames:
                    if is_image(name):
                        path = Path(dirpath) / name
                        files.append((path.relative_to(d).as_posix(), path))
            names = wanted[cat]
            if names is not None:
                files = [(rel, p) for rel, p in files if p.stem in names]
                stems = [p.stem for _, p in files]
                if len(set(stems)) != len(stems):
                    dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
                    raise DataError(d, f"listed name(s) match more than one file, e.g. {dup}")
                found[cat] = set(stems)
            if not files:
                what = "listed " if names is not None else ""
                exts = ",".join(self.extensions)
                raise DataError(d, f"no {what}image found (searched recursively for *.{{{exts}}})")
            files.sort()
            self.paths.extend(p for _, p in files)
            self.labels.extend([label] * len(files))

        # A listed name matching no file means the export is incomplete: refuse rather than train
        # on a silently smaller selection. One shared list needs each name in some category.
        if isinstance(list_file, Mapping):
            checks = [(list_file[c], wanted[c], found[c]) for c in list_file]
        elif list_file is not None:
            checks = [(list_file, wanted[self.categories[0]], set().union(*found.values()))]
        else:
            checks = []
        for path, names, seen in checks:
            missing = sorted(names - seen)
            if missing:
                raise DataError(
                    path,
                    f"{len(missing)} listed name(s) not found under {self.root}, "
                    f"e.g. {missing[:5]}",
                )

    @staticmethod
    def _read_names(path: PathLike) -> set[str]:
        rows = read_list_file(path, what="image name list (one name per line, no extension)")
        if any(len(row) != 1 for row in rows):
            raise DataError(path, "expected one image name per line")
        return {row[0] for row in rows}

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        label = self.labels[index]
        return {
            "image": decode_rgb(_read_bytes(path), path),
            "category": self.categories[label],
            "label": label,
            "key": path.stem,
            "index": index,
        }


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingFileError(path, "image file (removed after the folder was indexed?)") from exc
    except OSError as exc:
        raise DataError(path, f"cannot read image file: {exc}") from exc
