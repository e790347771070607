"""LSUN LMDB writer, exporter, LSUNLmdb and ImageFolderDataset (spec section 1, pitfalls 23-26)."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mesadepth.data import lsun
from mesadepth.data.lsun import (
    ImageFolderDataset,
    LSUNLmdb,
    close_lmdb_envs,
    export_lsun_folder,
    lsun_key,
    selection_file_name,
    write_lsun_lmdb,
)
from mesadepth.errors import ConfigError, DataError, MissingFileError

H, W = 32, 48
HEX40 = re.compile(rb"[0-9a-f]{40}")


def smooth_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour fields: lossy codecs reproduce them closely, unlike pixel noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        grid = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        img = Image.fromarray(grid, "RGB").resize((W, H), Image.BILINEAR)
        out.append(np.asarray(img))
    return out


def is_jpeg(value: bytes) -> bool:
    return value[:3] == b"\xff\xd8\xff"


def is_webp(value: bytes) -> bool:
    return value[:4] == b"RIFF" and value[8:12] == b"WEBP"


def read_env(lmdb_dir: Path) -> list[tuple[bytes, bytes]]:
    close_lmdb_envs()  # py-lmdb allows one handle per environment per process
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


@pytest.fixture(autouse=True)
def _close_handles():
    yield
    close_lmdb_envs()


@pytest.fixture
def bedroom(tmp_path: Path) -> tuple[Path, list[str], list[np.ndarray]]:
    images = smooth_images(6)
    keys = write_lsun_lmdb(tmp_path / "lsun", "bedroom", images)
    return tmp_path / "lsun", keys, images


def test_lsun_key_is_40_hex_ascii() -> None:
    key = lsun_key("0")
    assert isinstance(key, bytes) and HEX40.fullmatch(key)
    assert key == lsun_key("0") != lsun_key("1")


def test_written_env_layout_entries_keys_formats(bedroom) -> None:
    root, keys, images = bedroom
    lmdb_dir = root / "bedroom_train_lmdb"
    assert sorted(os.listdir(lmdb_dir)) == ["data.mdb", "lock.mdb"]
    assert os.listdir(root) == ["bedroom_train_lmdb"]  # no temporary directory left behind
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, map_size=0)  # 0: the stored size
    try:
        assert env.stat()["entries"] == 6
        assert env.info()["map_size"] >= 64 << 20
    finally:
        env.close()
    entries = read_env(lmdb_dir)
    cursor_keys = [k for k, _ in entries]
    assert cursor_keys == sorted(cursor_keys)  # LMDB iterates in bytewise key order
    assert all(HEX40.fullmatch(k) for k in cursor_keys)
    assert sorted(k.decode("ascii") for k in cursor_keys) == sorted(keys)
    values = dict(entries)
    formats = [("jpeg" if is_jpeg(v) else "webp" if is_webp(v) else "?") for v in values.values()]
    assert sorted(set(formats)) == ["jpeg", "webp"]
    for key, src in zip(keys, images, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(values[key.encode()])).convert("RGB"))
        assert decoded.shape == (H, W, 3)
        assert np.abs(decoded.astype(int) - src).mean() < 6  # lossy JPEG q75 / WebP q75


def test_write_refuses_existing_env(bedroom) -> None:
    root, _, images = bedroom
    with pytest.raises(FileExistsError):
        write_lsun_lmdb(root, "bedroom", images)


def test_lsunlmdb_items_match_sources(bedroom) -> None:
    root, keys, images = bedroom
    ds = LSUNLmdb(root, categories=["bedroom"])
    assert len(ds) == 6
    by_key = dict(zip(keys, images, strict=True))
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].dtype == np.uint8 and item["image"].shape == (H, W, 3)
        assert item["category"] == "bedroom" and item["label"] == 0 and item["index"] == i
        assert np.abs(item["image"].astype(int) - by_key[item["key"]]).mean() < 6
    assert [ds[i]["key"] for i in range(6)] == sorted(keys)
    clone = pickle.loads(pickle.dumps(ds))  # no handle inside: fine for spawn-started workers
    np.testing.assert_array_equal(clone[3]["image"], ds[3]["image"])


def test_torchvision_lsun_reads_the_same_env(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import LSUN

    root = tmp_path / "lsun"
    write_lsun_lmdb(root, "bedroom", smooth_images(3, seed=1))
    write_lsun_lmdb(root, "kitchen", smooth_images(4, seed=2))
    ours = LSUNLmdb(root, categories=["bedroom", "kitchen"])
    expected = [(ours[i]["image"], ours[i]["label"]) for i in range(len(ours))]
    close_lmdb_envs()
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)  # torchvision writes its key cache into the working directory
    tv = LSUN(str(root), classes=["bedroom_train", "kitchen_train"])
    try:
        assert len(tv) == len(ours) == 7
        for i, (image, label) in enumerate(expected):
            tv_img, tv_target = tv[i]
            np.testing.assert_array_equal(np.asarray(tv_img), image)  # same bytes, same decoder
            assert tv_target == label  # position in the given class list
    finally:
        for db in tv.dbs:
            db.env.close()
    assert any(p.name.startswith("_cache_") for p in scratch.iterdir())  # pitfall 24, theirs
    assert not any(p.name.startswith("_cache_") for p in root.iterdir())


def test_export_nested_and_flat_match_lmdb(bedroom, tmp_path: Path) -> None:
    root, keys, _ = bedroom
    lmdb_dir = root / "bedroom_train_lmdb"
    assert export_lsun_folder(lmdb_dir, tmp_path / "nested" / "bedroom") == 6
    assert export_lsun_folder(lmdb_dir, tmp_path / "flat" / "bedroom", flat=True) == 6
    for key, value in read_env(lmdb_dir):
        k = key.decode()
        nested = (
            tmp_path / "nested" / "bedroom" / k[0] / k[1] / k[2] / k[3] / k[4] / k[5] / f"{k}.webp"
        )
        assert nested.read_bytes() == value  # byte-for-byte, .webp even for JPEG content
        assert (tmp_path / "flat" / "bedroom" / f"{k}.webp").read_bytes() == value
    ref = LSUNLmdb(root, categories=["bedroom"])
    nested_ds = ImageFolderDataset(tmp_path / "nested")  # sub-folders of root = categories
    flat_ds = ImageFolderDataset(tmp_path / "flat" / "bedroom")  # root holds images directly
    assert nested_ds.categories == flat_ds.categories == ("bedroom",)
    assert len(nested_ds) == len(flat_ds) == len(ref) == 6
    for i in range(6):
        a, b, c = ref[i], nested_ds[i], flat_ds[i]
        assert a["key"] == b["key"] == c["key"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["image"], c["image"])
        assert b["label"] == 0 and b["category"] == "bedroom"


def test_image_folder_list_file_and_order(bedroom, tmp_path: Path) -> None:
    root, keys, _ = bedroom
    export_lsun_folder(root / "bedroom_train_lmdb", tmp_path / "out" / "bedroom")
    chosen = sorted(keys)[1:4]
    (tmp_path / "list.txt").write_text("\n".join(reversed(chosen)))  # no final newline on purpose
    ds = ImageFolderDataset(
        tmp_path / "out", categories=["bedroom"], list_file=tmp_path / "list.txt"
    )
    assert [ds[i]["key"] for i in range(len(ds))] == chosen
    (tmp_path / "bad.txt").write_text(chosen[0] + "\n" + "f" * 40 + "\n")
    with pytest.raises(DataError, match="1 listed name"):
        ImageFolderDataset(tmp_path / "out", list_file=tmp_path / "bad.txt")


def test_cap_draws_deterministic_subsets(tmp_path: Path) -> None:
    root = tmp_path / "lsun"
    cats = ["bedroom", "dining_room", "kitchen"]
    full = {c: write_lsun_lmdb(root, c, smooth_images(10, seed=i)) for i, c in enumerate(cats)}
    a = LSUNLmdb(root, categories=cats, cap_per_category=4, seed=0)
    b = LSUNLmdb(root, categories=cats, cap_per_category=4, seed=0)
    c = LSUNLmdb(root, categories=cats, cap_per_category=4, seed=1)
    assert len(a) == 12
    for cat in cats:
        assert a.keys(cat) == b.keys(cat)
        assert len(a.keys(cat)) == 4 == len(set(a.keys(cat)))
        assert set(a.keys(cat)) <= set(full[cat])
        assert a.keys(cat) == sorted(a.keys(cat))
    assert any(a.keys(cat) != c.keys(cat) for cat in cats)
    # The documented rule: positions from default_rng(seed).choice over the sorted key list.
    pos = np.sort(np.random.default_rng(0).choice(10, size=4, replace=False))
    assert a.keys("kitchen") == [sorted(full["kitchen"])[p] for p in pos]
    # Items come from the selection only, labels follow the category list.
    assert {(a[i]["category"], a[i]["key"]) for i in range(12)} == {
        (cat, k) for cat in cats for k in a.keys(cat)
    }
    # Saved selections reproduce the dataset.
    saved = a.save_selection(tmp_path / "sel")
    assert {p.name for p in saved.values()} == {f"lsun_{cat}_4.txt" for cat in cats}
    d = LSUNLmdb(root, categories=cats, key_lists=saved)
    assert all(d.keys(cat) == a.keys(cat) for cat in cats)
    with pytest.raises(ConfigError, match="cap_per_category"):
        LSUNLmdb(root, categories=cats, key_lists=saved, cap_per_category=5)
    with pytest.raises(DataError, match="fewer than cap_per_category"):
        LSUNLmdb(root, categories=cats, cap_per_category=11)
    assert selection_file_name("bedroom", 300_000) == "lsun_bedroom_300k.txt"


def test_key_cache_written_reused_and_rebuilt(bedroom, tmp_path: Path, monkeypatch) -> None:
    root, keys, _ = bedroom
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cache_dir = tmp_path / "cache"
    LSUNLmdb(root, categories=["bedroom"], key_cache_dir=cache_dir)
    (cache,) = cache_dir.iterdir()
    assert cache.read_text().split() == sorted(keys)
    assert list(cwd.iterdir()) == []  # never caches in the working directory

    def no_walk(env):
        raise AssertionError("keys enumerated again although a valid cache exists")

    monkeypatch.setattr(lsun, "_enumerate_keys", no_walk)
    ds = LSUNLmdb(root, categories=["bedroom"], key_cache_dir=cache_dir)
    assert ds.keys("bedroom") == sorted(keys)
    monkeypatch.undo()
    cache.write_text("\n".join(sorted(keys)[:2]) + "\n")  # stale: fewer lines than entries
    ds = LSUNLmdb(root, categories=["bedroom"], key_cache_dir=cache_dir)
    assert len(ds) == 6 and cache.read_text().split() == sorted(keys)


def test_label_is_position_in_given_list(tmp_path: Path) -> None:
    root = tmp_path / "lsun"
    write_lsun_lmdb(root, "bedroom", smooth_images(2, seed=3))
    write_lsun_lmdb(root, "kitchen", smooth_images(3, seed=4))
    ds = LSUNLmdb(root, categories=("kitchen", "bedroom"))
    got = [(ds[i]["category"], ds[i]["label"]) for i in range(len(ds))]
    assert got == [("kitchen", 0)] * 3 + [("bedroom", 1)] * 2


def _tag_process(sample: dict) -> dict:
    # Records which process read the item and whether that process holds its own handle.
    sample["pid"] = os.getpid()
    sample["own_handle"] = any(pid == os.getpid() for pid, _ in lsun._ENVS)
    return sample


def _keep_list(batch):
    return batch


def test_dataloader_workers_open_their_own_handles(tmp_path: Path) -> None:
    root = tmp_path / "lsun"
    keys = write_lsun_lmdb(root, "bedroom", smooth_images(6, seed=5))
    ds = LSUNLmdb(root, categories=["bedroom"], transform=_tag_process)
    assert ds[0]["own_handle"]  # the parent holds a handle before the workers fork
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_keep_list)
    items = [item for batch in loader for item in batch]
    assert sorted(item["key"] for item in items) == sorted(keys)
    assert all(item["own_handle"] and item["pid"] != os.getpid() for item in items)
    assert ds[1]["key"] == sorted(keys)[1]  # the parent's handle still works afterwards


def test_corrupt_value_raises_or_is_skipped(bedroom) -> None:
    root, keys, _ = bedroom
    lmdb_dir = root / "bedroom_train_lmdb"
    values = dict(read_env(lmdb_dir))
    bad = sorted(keys)[2]
    env = lmdb.open(str(lmdb_dir), map_size=64 << 20)
    with env.begin(write=True) as txn:
        txn.put(bad.encode(), values[bad.encode()][:40])  # truncated image file
    env.close()
    ds = LSUNLmdb(root, categories=["bedroom"])
    with pytest.raises(DataError) as info:
        ds[2]
    assert f"{lmdb_dir}:{bad}" in str(info.value)
    assert ds[1]["key"] == sorted(keys)[1]
    skip = LSUNLmdb(root, categories=["bedroom"], on_error="skip")
    item = skip[2]
    assert item["key"] == sorted(keys)[3] and item["index"] == 3  # next valid, deterministic
    assert skip.bad.total == 1 and bad in skip.bad.summary()
    assert [skip[i]["key"] for i in range(6)].count(sorted(keys)[3]) == 2


def test_missing_category_dir_names_it(bedroom) -> None:
    root, _, _ = bedroom
    with pytest.raises(MissingFileError) as info:
        LSUNLmdb(root, categories=["bedroom", "kitchen"])
    msg = str(info.value)
    assert str(root / "kitchen_train_lmdb") in msg and "bedroom_train_lmdb" in msg
    with pytest.raises(MissingFileError, match="living_room"):
        ImageFolderDataset(root, categories=["living_room"])


def test_folder_without_images_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "imgs" / "bedroom"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".x.123.tmp.webp").write_bytes(b"partial")  # left by an interrupted atomic write
    with pytest.raises(DataError, match=r"no image found.*webp,jpg,jpeg,png") as info:
        ImageFolderDataset(tmp_path / "imgs")
    assert str(folder) in str(info.value)


def test_folder_corrupt_file_skip(tmp_path: Path) -> None:
    folder = tmp_path / "imgs" / "kitchen"
    folder.mkdir(parents=True)
    for i, img in enumerate(smooth_images(3, seed=6)):
        Image.fromarray(img).save(folder / f"img{i}.png")
    (folder / "img1.png").write_bytes((folder / "img1.png").read_bytes()[:30])
    with pytest.raises(DataError, match="img1.png"):
        ImageFolderDataset(tmp_path / "imgs")[1]
    ds = ImageFolderDataset(tmp_path / "imgs", on_error="skip")
    assert ds[1]["key"] == "img2" and ds.bad.total == 1
    assert ds[0]["category"] == "kitchen" and ds[0]["image"].shape == (H, W, 3)
