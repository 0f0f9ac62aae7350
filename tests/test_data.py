"""Tests for distill_jax.data.

Fast tests use synthetic arrays and never prepare a TFDS dataset. Tests marked
``slow`` use the real IDX files from ``<repo_root>/../shared/data`` and share
one session-scoped TFDS data dir, prepared once per run (fashion_mnist first,
then mnist: exactly the order that used to corrupt mnist, see trap 1).
"""

from __future__ import annotations

import gzip
import hashlib
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_jax import data
from distill_jax.data import tfds_loading
from distill_jax.data.tfds_loading import Dataset

HYP = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Independent reader for gzip IDX files (uint8 payload only)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    assert raw[0] == 0 and raw[1] == 0 and raw[2] == 0x08, f"{path}: not a uint8 IDX file"
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def content(images: np.ndarray, labels: np.ndarray) -> Counter:
    """Multiset of (image hash, label): equal iff same examples, in any order."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), -1)
    return Counter(
        (hashlib.sha1(row.tobytes()).digest(), int(lab)) for row, lab in zip(images, np.asarray(labels))
    )


def to_uint8(images: jax.Array) -> np.ndarray:
    """Undo the /255 scaling exactly (k/255 in float32 rounds back to k)."""
    return np.rint(np.asarray(images) * 255.0).astype(np.uint8)


def synthetic(n: int = 50, seed: int = 0, num_classes: int = 10) -> Dataset:
    """Small dataset whose pixel [0,0,0] stores the example index (to track examples)."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, 6, 5, 1), dtype=np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    return Dataset(jnp.asarray(images), jnp.asarray(labels))


def ids(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.images[..., 0, 0, 0]).astype(np.int64).reshape(-1)


# README.txt of the shared MNIST folder documents these counts.
MNIST_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


# ---------------------------------------------------------------------------
# Loading: fast tests (no TFDS preparation)
# ---------------------------------------------------------------------------


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No env overrides, no shared folder, and any TFDS download raises.

    Returns a dict of the paths involved and a list recording download attempts.
    """
    import tensorflow_datasets as tfds

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
    missing_shared = tmp_path / "no_shared" / "data"
    monkeypatch.setattr(tfds_loading, "shared_data_root", lambda: missing_shared)
    attempts: list[str] = []

    def no_network(self, resource):
        attempts.append(resource.url)
        raise ConnectionError(f"network disabled in tests ({resource.url})")

    # The one place TFDS touches the network for these builders.
    monkeypatch.setattr(tfds.download.DownloadManager, "_download", no_network, raising=True)
    # Let the fast reachability probe pass, so TFDS's own download path runs.
    monkeypatch.setattr(tfds_loading, "_download_blocker", lambda builder: None)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    return {"data_dir": data_dir, "shared": missing_shared, "attempts": attempts}


def test_unsupported_name_lists_supported():
    with pytest.raises(ValueError, match="mnist, fashion_mnist"):
        data.load_split("cifar10", "train")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir(None) is None  # TFDS default
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir(None) == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_shared_root_is_beside_repo():
    repo = Path(data.__file__).resolve().parents[2]
    assert (repo / "distill_jax").is_dir()
    assert data.shared_data_root() == repo.parent / "shared" / "data"


def test_missing_dependency_is_named(monkeypatch, isolated_env):
    real = tfds_loading._module_available
    monkeypatch.setattr(tfds_loading, "_module_available", lambda m: m != "PIL" and real(m))
    assert data.missing_prepare_dependencies() == ["pillow"]
    msg = "pillow.*pip install tensorflow-cpu pillow importlib_resources"
    with pytest.raises(ImportError, match=msg):
        data.check_prepare_dependencies()
    # ...and load_split checks before preparing anything.
    with pytest.raises(ImportError, match=msg):
        data.load_split("mnist", "test", data_dir=isolated_env["data_dir"])
    assert isolated_env["attempts"] == []


def test_missing_data_names_every_place(monkeypatch, isolated_env, tmp_path, caplog):
    empty_env = tmp_path / "empty_manual"
    empty_env.mkdir()
    monkeypatch.setenv(data.MANUAL_DIR_ENV, str(empty_env))
    arg_dir = tmp_path / "typo"
    data_dir = isolated_env["data_dir"]
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        data.load_split("mnist", "train", data_dir=data_dir, manual_dir=arg_dir)
    elapsed = time.perf_counter() - start
    assert isinstance(info.value, data.DatasetNotFoundError)
    msg = str(info.value)
    for place in [
        arg_dir,
        arg_dir / "mnist",
        empty_env,
        empty_env / "mnist",
        isolated_env["shared"] / "mnist",
        data_dir / "downloads" / "manual" / "mnist",
        data_dir / "downloads" / "manual",
        data_dir / "mnist" / "3.0.1",  # the prepared-dataset location
    ]:
        assert str(place) in msg, f"{place} missing from:\n{msg}"
    for hint in ["manual_dir=", data.MANUAL_DIR_ENV, "online download", *data.IDX_FILES]:
        assert hint in msg, f"{hint!r} missing from:\n{msg}"
    assert "ConnectionError" in msg  # the wrapped download failure
    assert isolated_env["attempts"], "the online download should have been tried once no local source existed"
    assert elapsed < 30
    # Folders the user named explicitly but that were unusable are also logged.
    assert f"Ignoring manual_dir argument {arg_dir}" in caplog.text
    assert f"Ignoring ${data.MANUAL_DIR_ENV} {empty_env}" in caplog.text


def test_unreachable_hosts_fail_fast_without_tfds_download(monkeypatch, isolated_env):
    monkeypatch.setattr(
        tfds_loading, "_download_blocker", lambda builder: "not attempted: cannot connect to example:443"
    )
    with pytest.raises(data.DatasetNotFoundError, match="online download: not attempted"):
        data.prepare("fashion_mnist", data_dir=isolated_env["data_dir"])
    assert isolated_env["attempts"] == []


def test_download_probe(monkeypatch):
    class FakeBuilder:
        url_infos = {"https://a.example/x.gz": None, "https://a.example/y.gz": None, "http://b.example/z": None}

    tried = []

    def refuse(address, timeout):
        tried.append(address)
        raise OSError("unreachable")

    monkeypatch.setattr(tfds_loading.socket, "create_connection", refuse)
    monkeypatch.setattr(tfds_loading.urllib.request, "getproxies", lambda: {})
    assert "cannot connect to a.example:443" in tfds_loading._download_blocker(FakeBuilder())
    assert tried == [("a.example", 443)]
    # Behind a proxy a direct connection proves nothing: let TFDS try.
    monkeypatch.setattr(tfds_loading.urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    assert tfds_loading._download_blocker(FakeBuilder()) is None


def test_wrong_dataset_files_are_rejected_by_size(shared_dirs, isolated_env):
    # Fashion files carry MNIST's file names; only the sizes tell them apart.
    with pytest.raises(FileNotFoundError, match="bytes, expected"):
        data.prepare("mnist", data_dir=isolated_env["data_dir"], manual_dir=shared_dirs["fashion_mnist"])


def test_manual_dir_env_accepts_subfolder_or_files(monkeypatch, tmp_path, shared_dirs):
    monkeypatch.setattr(tfds_loading, "shared_data_root", lambda: tmp_path / "nowhere")

    def fill(folder: Path, name: str) -> None:
        folder.mkdir(parents=True)
        for f in data.IDX_FILES:
            (folder / f).symlink_to(shared_dirs[name] / f)

    with_sub = tmp_path / "with_sub"
    fill(with_sub / "mnist", "mnist")
    fill(with_sub / "fashion_mnist", "fashion_mnist")
    direct = tmp_path / "direct"
    fill(direct, "mnist")
    expected = lambda name: {  # noqa: E731 - real sizes, as the builder registers them
        f: (shared_dirs[name] / f).stat().st_size for f in data.IDX_FILES
    }
    root = tmp_path / "tfds"
    for name in data.SUPPORTED_DATASETS:
        monkeypatch.setenv(data.MANUAL_DIR_ENV, str(with_sub))
        assert data.find_manual_dir(name, root, expected=expected(name))[0] == with_sub / name
    monkeypatch.setenv(data.MANUAL_DIR_ENV, str(direct))
    assert data.find_manual_dir("mnist", root, expected=expected("mnist"))[0] == direct
    # mnist files in the direct folder must not be taken for fashion_mnist.
    found, rejected = data.find_manual_dir("fashion_mnist", root, expected=expected("fashion_mnist"))
    assert found is None
    assert any(c.path == direct and "expected" in why for c, why in rejected)
    # The argument comes before the env var.
    assert data.find_manual_dir("mnist", root, manual_dir=with_sub, expected=expected("mnist"))[0] == with_sub / "mnist"


# ---------------------------------------------------------------------------
# Loading: real data (slow)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_dirs() -> dict[str, Path]:
    """The shared IDX folders; missing ones FAIL (CI always has them), never skip."""
    root = tfds_loading.shared_data_root()
    out = {}
    for name in data.SUPPORTED_DATASETS:
        folder = root / name
        missing = [f for f in data.IDX_FILES if not (folder / f).is_file()]
        if missing:
            pytest.fail(
                f"Shared data folder {folder} lacks {', '.join(missing)}. The repo expects "
                f"<repo_root>/../shared/data/<name>/ with the four IDX .gz files of each dataset.",
                pytrace=False,
            )
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory, shared_dirs) -> Path:
    """A fresh TFDS data dir with fashion_mnist prepared first, then mnist.

    That order used to hand back Fashion images as MNIST (trap 1), so every
    test reading mnist from here also guards that fix. Found through the
    default lookup (the shared folder), with env overrides cleared.
    """
    data_dir = tmp_path_factory.mktemp("tfds_shared")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(data.MANUAL_DIR_ENV, raising=False)
        mp.delenv(data.DATA_DIR_ENV, raising=False)
        data.prepare("fashion_mnist", data_dir=data_dir)
        data.prepare("mnist", data_dir=data_dir)
    return data_dir


@pytest.mark.slow
def test_load_split_contract(prepared_data_dir):
    for split, n in [("train", 60000), ("test", 10000)]:
        ds = data.load_split("mnist", split, data_dir=prepared_data_dir)
        assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == jnp.float32
        assert ds.labels.shape == (n,) and ds.labels.dtype == jnp.int32
        assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
        assert ds.images.devices() == {jax.devices()[0]}
        assert data.class_counts(ds).tolist() == MNIST_COUNTS[split]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_then_mnist_gives_mnist(prepared_data_dir, shared_dirs, split):
    """Trap 1: in a dir where fashion_mnist was prepared first, mnist is still MNIST."""
    mnist = data.load_split("mnist", split, data_dir=prepared_data_dir)
    got = content(to_uint8(mnist.images), mnist.labels)
    want = content(*idx_split(shared_dirs["mnist"], split))
    assert got == want, f"{sum((got - want).values())} mnist examples are not in the MNIST IDX file"
    fashion = data.load_split("fashion_mnist", split, data_dir=prepared_data_dir)
    assert content(to_uint8(fashion.images), fashion.labels) == content(
        *idx_split(shared_dirs["fashion_mnist"], split)
    )
    assert not np.array_equal(np.asarray(mnist.images), np.asarray(fashion.images))
    assert not set(got) & set(content(to_uint8(fashion.images), fashion.labels))


@pytest.mark.slow
def test_tfds_order_is_shuffled_but_deterministic(prepared_data_dir, shared_dirs):
    """Trap 3: same examples as the IDX file, other order, same order every time."""
    images, labels = data.load_split_numpy("mnist", "test", data_dir=prepared_data_dir)
    idx_images, idx_labels = idx_split(shared_dirs["mnist"], "test")
    assert content(images, labels) == content(idx_images, idx_labels)
    same_position = np.all(images[..., 0] == idx_images, axis=(1, 2))
    assert same_position.mean() < 0.05, "TFDS order unexpectedly equals the IDX order"
    assert not np.array_equal(labels, idx_labels)

    data.clear_cache()  # force a second decode from disk
    images2, labels2 = data.load_split_numpy("mnist", "test", data_dir=prepared_data_dir)
    assert images2 is not images
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2, labels)


@pytest.mark.slow
def test_repeated_loads_hit_the_cache(prepared_data_dir):
    first = data.load_split_numpy("mnist", "test", data_dir=prepared_data_dir)
    start = time.perf_counter()
    second = data.load_split_numpy("mnist", "test", data_dir=prepared_data_dir)
    assert time.perf_counter() - start < 0.1
    assert second[0] is first[0] and second[1] is first[1]
    assert not first[0].flags.writeable  # shared arrays must not be mutated


@pytest.mark.slow
def test_prepared_dir_needs_no_files_or_network(prepared_data_dir, isolated_env):
    builder = data.prepare("mnist", data_dir=prepared_data_dir)
    assert builder.is_prepared()
    assert isolated_env["attempts"] == []


# ---------------------------------------------------------------------------
# Transfer sets
# ---------------------------------------------------------------------------


def test_drop_and_keep_classes():
    ds = synthetic(200)
    labels = np.asarray(ds.labels)
    dropped = data.drop_classes(ds, [3])
    assert 3 not in np.asarray(dropped.labels)
    np.testing.assert_array_equal(ids(dropped), np.flatnonzero(labels != 3))
    kept = data.keep_classes(ds, (1, 7))
    np.testing.assert_array_equal(ids(kept), np.flatnonzero(np.isin(labels, [1, 7])))
    assert len(kept.labels) + len(data.drop_classes(ds, [1, 7]).labels) == 200


@pytest.mark.parametrize("classes", [[10], [-1], [], [1.5]])
def test_class_ids_validated(classes):
    with pytest.raises(ValueError):
        data.drop_classes(synthetic(), classes)


def test_filter_leaving_nothing_is_an_error():
    with pytest.raises(ValueError, match="no examples"):
        data.drop_classes(synthetic(), range(10))


def test_take_subset_seeded():
    ds = synthetic(100)
    a = data.take_subset(ds, 30, seed=1)
    assert len(a.labels) == 30 and len(set(ids(a))) == 30
    assert np.all(np.diff(ids(a)) > 0)  # dataset order kept
    np.testing.assert_array_equal(ids(a), ids(data.take_subset(ds, 30, seed=1)))
    assert not np.array_equal(ids(a), ids(data.take_subset(ds, 30, seed=2)))
    np.testing.assert_array_equal(ids(data.take_subset(ds, 100, seed=0)), np.arange(100))
    for bad in (0, 101):
        with pytest.raises(ValueError, match="n must be"):
            data.take_subset(ds, bad, seed=0)


def test_train_val_split_partitions():
    ds = synthetic(100)
    train, val = data.train_val_split(ds, 20, seed=0)
    assert len(val.labels) == 20 and len(train.labels) == 80
    assert sorted(np.concatenate([ids(train), ids(val)]).tolist()) == list(range(100))
    # Not "the last 20": a random subset.
    assert not np.array_equal(np.sort(ids(val)), np.arange(80, 100))
    again = data.train_val_split(ds, 20, seed=0)[1]
    np.testing.assert_array_equal(ids(val), ids(again))
    for bad in (0, 100):
        with pytest.raises(ValueError, match="num_val"):
            data.train_val_split(ds, bad, seed=0)


def test_class_counts():
    ds = Dataset(jnp.zeros((5, 2, 2, 1)), jnp.asarray([0, 2, 2, 9, 0], jnp.int32))
    assert data.class_counts(ds).tolist() == [2, 0, 2, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="outside"):
        data.class_counts(ds, num_classes=5)


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def shift_reference(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """np.roll, then zero what wrapped around: a translation with zero fill."""
    out = np.roll(img, (dy, dx), axis=(0, 1))
    h, w = img.shape[:2]
    if dy > 0:
        out[:dy] = 0
    elif dy < 0:
        out[h + dy :] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, w + dx :] = 0
    return out


# Few distinct shapes: every new shape (and max_shift) is a new XLA compile.
IMAGE_SHAPES = [(2, 5, 7, 1), (1, 1, 3, 2)]


@st.composite
def image_batches(draw):
    shape = draw(st.sampled_from(IMAGE_SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    # Positive values so zero fill is distinguishable from content.
    return np.random.default_rng(seed).integers(1, 256, size=shape).astype(np.float32)


@HYP
@given(imgs=image_batches(), seed=st.integers(0, 2**31 - 1), max_shift=st.sampled_from([0, 1, 3]))
def test_jitter_is_a_zero_filled_shift(imgs, seed, max_shift):
    out = np.asarray(data.jitter(jax.random.key(seed), jnp.asarray(imgs), max_shift=max_shift))
    assert out.shape == imgs.shape and out.dtype == imgs.dtype
    for img, got in zip(imgs, out):
        assert set(np.unique(got)) <= set(np.unique(img)) | {0.0}
        matches = [
            (dy, dx)
            for dy in range(-max_shift, max_shift + 1)
            for dx in range(-max_shift, max_shift + 1)
            if np.array_equal(got, shift_reference(img, dy, dx))
        ]
        assert matches, "output is not a translation within max_shift"


@HYP
@given(imgs=image_batches(), seed=st.integers(0, 2**31 - 1))
def test_jitter_zero_is_identity(imgs, seed):
    np.testing.assert_array_equal(np.asarray(data.jitter(jax.random.key(seed), jnp.asarray(imgs), 0)), imgs)


@HYP
@given(imgs=image_batches(), data_=st.data())
def test_translate_matches_reference(imgs, data_):
    b, h, w, _ = imgs.shape
    shifts = np.array(
        [[data_.draw(st.integers(-h - 1, h + 1)), data_.draw(st.integers(-w - 1, w + 1))] for _ in range(b)]
    )
    out = np.asarray(data.translate(jnp.asarray(imgs), jnp.asarray(shifts)))
    for img, got, (dy, dx) in zip(imgs, out, shifts):
        if abs(dy) >= h or abs(dx) >= w:
            assert not got.any()
        else:
            np.testing.assert_array_equal(got, shift_reference(img, dy, dx))


def test_jitter_shifts_independently_and_covers_range():
    # One bright pixel in the middle: its new position reveals each shift.
    imgs = np.zeros((512, 9, 9, 1), np.float32)
    imgs[:, 4, 4, 0] = 1.0
    out = np.asarray(data.jitter(jax.random.key(0), jnp.asarray(imgs), max_shift=2))
    flat = out[..., 0].reshape(512, 81)
    assert (flat.sum(axis=1) == 1).all()  # |shift| <= 2 never pushes the pixel out
    pos = flat.argmax(axis=1)
    ys, xs = pos // 9 - 4, pos % 9 - 4
    assert set(ys.tolist()) == set(range(-2, 3)) and set(xs.tolist()) == set(range(-2, 3))
    assert len(set(zip(ys.tolist(), xs.tolist()))) == 25


def test_jitter_jits_and_vmaps():
    imgs = jnp.ones((3, 4, 8, 8, 1))
    keys = jax.random.split(jax.random.key(0), 3)
    out = jax.jit(jax.vmap(lambda k, x: data.jitter(k, x, max_shift=1)))(keys, imgs)
    assert out.shape == imgs.shape
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        data.jitter(jax.random.key(0), jnp.ones((8, 8, 1)))
    with pytest.raises(ValueError, match="max_shift"):
        data.jitter(jax.random.key(0), imgs[0], max_shift=-1)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def test_num_batches():
    assert data.num_batches(10, 3) == 3
    assert data.num_batches(10, 3, drop_remainder=False) == 4
    assert data.num_batches(9, 3, drop_remainder=False) == 3
    assert data.num_batches(0, 3) == 0
    with pytest.raises(ValueError):
        data.num_batches(10, 0)


# (n, batch_size) pairs: exact fit, remainder, batch of one, batch larger than n.
BATCH_CASES = [(64, 8), (37, 5), (9, 1), (6, 7)]


@pytest.mark.parametrize("n, batch_size", BATCH_CASES)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_epoch_batches_is_a_permutation(n, batch_size, seed):
    ds = synthetic(n, seed=seed % 7)  # contents vary, shape does not (one compile)
    if n < batch_size:
        with pytest.raises(ValueError, match="smaller than batch_size"):
            data.epoch_batches(jax.random.key(seed), ds, batch_size)
        return
    out = data.epoch_batches(jax.random.key(seed), ds, batch_size)
    steps = n // batch_size
    assert out.images.shape == (steps, batch_size, 6, 5, 1)
    assert out.labels.shape == (steps, batch_size)
    got = ids(Dataset(out.images.reshape(-1, 6, 5, 1), out.labels.reshape(-1)))
    assert len(set(got.tolist())) == steps * batch_size  # no duplicates
    assert set(got.tolist()) <= set(range(n))
    # Labels travel with their images.
    np.testing.assert_array_equal(np.asarray(out.labels).reshape(-1), np.asarray(ds.labels)[got])


def test_epoch_batches_depends_on_key_only():
    ds = synthetic(64)
    a = data.epoch_batches(jax.random.key(0), ds, 8)
    b = data.epoch_batches(jax.random.key(0), ds, 8)
    c = data.epoch_batches(jax.random.key(1), ds, 8)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert not np.array_equal(np.asarray(a.labels), np.asarray(c.labels))


def test_epoch_batches_feeds_a_scan():
    ds = synthetic(40)
    batches = data.epoch_batches(jax.random.key(0), ds, 8)

    def step(total, batch):
        return total + batch.labels.shape[0], None

    total, _ = jax.lax.scan(step, 0, batches)
    assert int(total) == 40


@pytest.mark.parametrize("n, batch_size", BATCH_CASES + [(1, 1), (1, 4)])
def test_eval_batches_counts_every_example_once(n, batch_size):
    ds = synthetic(n)
    batches, mask = data.eval_batches(ds, batch_size)
    steps = -(-n // batch_size)
    assert mask.shape == (steps, batch_size) and mask.dtype == jnp.bool_
    assert int(mask.sum()) == n
    flat_ids = ids(Dataset(batches.images.reshape(-1, 6, 5, 1), batches.labels.reshape(-1)))
    np.testing.assert_array_equal(flat_ids[np.asarray(mask).reshape(-1)], np.arange(n))
    np.testing.assert_array_equal(
        np.asarray(batches.labels).reshape(-1)[np.asarray(mask).reshape(-1)], np.asarray(ds.labels)
    )
    assert not np.asarray(batches.images).reshape(steps * batch_size, -1)[~np.asarray(mask).reshape(-1)].any()
