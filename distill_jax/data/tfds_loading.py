"""Load MNIST / Fashion-MNIST through TFDS, offline from the original IDX files.

Why TFDS at all: it is the canonical, checksummed decoding path that the rest of
the ecosystem uses, so our numbers are comparable. Why the wrapper: TFDS has a
few sharp edges for offline use that this module files down.

* Offline sources. TFDS's DownloadManager looks for ``manual_dir/<url filename>``
  before it downloads anything, and verifies the registered sha256 of whatever
  it finds. We therefore only have to point it at a folder holding the four
  gzip IDX files. We look for such a folder in a fixed order (see
  :func:`manual_dir_candidates`) and check file names and sizes *before*
  calling TFDS, so a missing file gives one fast, explicit error instead of a
  slow failed download. Only when no local source exists do we let TFDS
  download, after a quick TCP probe of the hosts: offline, TFDS's own retries
  (10 per URL, exponential backoff) take about 3.5 minutes to give up.

* Shared extraction cache (trap 1). TFDS extracts a manually supplied file to
  ``extract_dir/GZIP.<file name>``. MNIST and Fashion-MNIST use the *same* file
  names, so with the default shared ``extract_dir`` preparing fashion_mnist and
  then mnist in one data dir silently reuses the Fashion extraction: you get
  clothing images labelled as digits. Every dataset here gets its own
  ``<data_dir>/downloads/extracted/<name>``.

* Undeclared dependencies (trap 2). Preparing these builders needs
  ``tensorflow``, ``pillow`` and ``importlib_resources`` although TFDS does not
  depend on them; without them preparation dies half-way with an obscure error.
  We check up front and say what to install.

* Example order (trap 3). TFDS stores examples in its own hash-shuffled order,
  not the IDX order. The order is deterministic (same arrays on every load),
  but "the last 10k examples" are *not* the last 10k of the IDX file. Derive any
  train/validation split from a seeded permutation
  (:func:`distill_jax.data.transfer.train_val_split`), never from positions.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")

#: The four gzip IDX files both builders expect (same names for both datasets).
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

DATA_DIR_ENV = "DISTILL_JAX_DATA_DIR"
MANUAL_DIR_ENV = "DISTILL_JAX_MANUAL_DIR"

#: (import name, pip name) of what TFDS needs to *prepare* these builders.
PREPARE_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("tensorflow", "tensorflow-cpu"),
    ("PIL", "pillow"),
    ("importlib_resources", "importlib_resources"),
)
_INSTALL_HINT = "pip install tensorflow-cpu pillow importlib_resources"

#: Seconds to wait for a TCP connection when probing the download hosts.
PROBE_TIMEOUT_S = 5.0


class Dataset(NamedTuple):
    """Images and labels held on device.

    From :func:`load_split`: images float32 ``[N, 28, 28, 1]`` in ``[0, 1]``,
    labels int32 ``[N]``. The batching helpers return the same type with
    leading ``[steps, B]`` axes. A NamedTuple so it is a pytree: it passes
    straight through ``jit`` and ``lax.scan``.
    """

    images: jax.Array
    labels: jax.Array


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of the IDX files was found and they could not be downloaded."""


class ManualDirCandidate(NamedTuple):
    """One place we look for the IDX files.

    source: human-readable label for messages; path: the folder; origin: one of
    "argument", "env", "shared", "data_dir", "tfds_default".
    """

    source: str
    path: Path
    origin: str


# --------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------


def repo_root() -> Path:
    """The repository root: the parent of the ``distill_jax`` package dir.

    Computed from this file, not the working directory, so it is right wherever
    CI clones the repo. Tests monkeypatch :func:`shared_data_root` instead.
    """
    return Path(__file__).resolve().parents[2]


def shared_data_root() -> Path:
    """``<repo_root>/../shared/data``: the read-only data folder beside the repo."""
    return repo_root().parent / "shared" / "data"


def _check_name(name: str) -> None:
    if name not in SUPPORTED_DATASETS:
        raise ValueError(
            f"Unsupported dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}."
        )


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The TFDS data dir: argument, else ``$DISTILL_JAX_DATA_DIR``, else ``None``.

    ``None`` means "let TFDS decide" (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser()


def manual_dir_candidates(
    name: str,
    data_dir_root: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
) -> list[ManualDirCandidate]:
    """Every folder that may hold ``name``'s IDX files, in lookup order.

    1. the ``manual_dir`` argument (its ``<name>/`` subfolder, then itself);
    2. ``$DISTILL_JAX_MANUAL_DIR`` (its ``<name>/`` subfolder, then itself);
    3. ``<repo_root>/../shared/data/<name>``;
    4. ``<data_dir>/downloads/manual/<name>``;
    5. ``<data_dir>/downloads/manual`` (TFDS's own default manual dir, which
       TFDS consults anyway, so we list it to report it).

    A folder may hold files for the other dataset under the same names; the
    size check in :func:`manual_dir_problem` rejects those.
    """
    _check_name(name)
    out: list[ManualDirCandidate] = []
    if manual_dir is not None:
        base = Path(manual_dir).expanduser()
        out.append(ManualDirCandidate(f"manual_dir argument, {name}/ subfolder", base / name, "argument"))
        out.append(ManualDirCandidate("manual_dir argument", base, "argument"))
    env = os.environ.get(MANUAL_DIR_ENV)
    if env:
        base = Path(env).expanduser()
        out.append(ManualDirCandidate(f"${MANUAL_DIR_ENV}, {name}/ subfolder", base / name, "env"))
        out.append(ManualDirCandidate(f"${MANUAL_DIR_ENV}", base, "env"))
    root = Path(data_dir_root).expanduser()
    manual = root / "downloads" / "manual"
    out.append(ManualDirCandidate("shared data folder beside the repo", shared_data_root() / name, "shared"))
    out.append(ManualDirCandidate("data_dir manual folder", manual / name, "data_dir"))
    out.append(ManualDirCandidate("TFDS default manual folder", manual, "tfds_default"))
    return out


def manual_dir_problem(path: Path, expected: Mapping[str, int | None]) -> str | None:
    """Why ``path`` cannot serve as manual_dir, or ``None`` if it can.

    ``expected`` maps file name -> byte size (``None``: do not check the size).
    Sizes differ between MNIST and Fashion-MNIST, so this cheaply catches the
    wrong dataset's files before TFDS's slower checksum failure.
    """
    if not path.is_dir():
        return "does not exist"
    missing = [f for f in expected if not (path / f).is_file()]
    if len(missing) == len(expected):
        return "no IDX files there"
    if missing:
        return "missing " + ", ".join(missing)
    for fname, size in expected.items():
        actual = (path / fname).stat().st_size
        if size is not None and actual != size:
            return f"{fname} has {actual} bytes, expected {size} (files of another dataset?)"
    return None


def _expected_files(builder) -> dict[str, int | None]:
    """File name -> registered size, from the builder's checksum registry."""
    infos = getattr(builder, "url_infos", None) or {}
    by_name = {info.filename: int(info.size) for info in infos.values() if info.filename}
    return {f: by_name.get(f) for f in IDX_FILES}


def find_manual_dir(
    name: str,
    data_dir_root: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    expected: Mapping[str, int | None] | None = None,
) -> tuple[Path | None, list[tuple[ManualDirCandidate, str]]]:
    """First usable candidate folder, plus (candidate, reason) for each rejected one."""
    expected = expected if expected is not None else {f: None for f in IDX_FILES}
    rejected: list[tuple[ManualDirCandidate, str]] = []
    for cand in manual_dir_candidates(name, data_dir_root, manual_dir):
        problem = manual_dir_problem(cand.path, expected)
        if problem is None:
            return cand.path, rejected
        rejected.append((cand, problem))
    return None, rejected


# --------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------


def _module_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_prepare_dependencies() -> list[str]:
    """Pip names of the packages TFDS needs for preparation but lacks."""
    return [pip for module, pip in PREPARE_REQUIREMENTS if not _module_available(module)]


def check_prepare_dependencies() -> None:
    """Raise ImportError naming what to install, before TFDS fails half-way."""
    missing = missing_prepare_dependencies()
    if missing:
        raise ImportError(
            "Preparing MNIST / Fashion-MNIST with tensorflow-datasets needs packages it "
            f"does not declare; missing: {', '.join(missing)}. "
            f"Install them with: {_INSTALL_HINT}"
        )


# --------------------------------------------------------------------------
# Preparation and decoding
# --------------------------------------------------------------------------


def _not_found_message(
    name: str,
    rejected: list[tuple[ManualDirCandidate, str]],
    prepared_dir: str,
    download_error: BaseException | str,
) -> str:
    lines = [f"Could not find the {name!r} IDX files locally, and downloading them failed.", "Looked in:"]
    lines += [f"  - {c.source}: {c.path} ({why})" for c, why in rejected]
    lines.append(f"  - prepared TFDS dataset: {prepared_dir} (not prepared)")
    if isinstance(download_error, str):
        lines.append(f"  - TFDS online download: {download_error}")
    else:
        detail = f"{type(download_error).__name__}: {download_error}".splitlines()[0][:300]
        lines.append(f"  - TFDS online download: failed ({detail})")
    lines += [
        "To supply the files, do one of:",
        f"  * pass manual_dir=/path/to/folder to load_split({name!r}, ...);",
        f"  * set {MANUAL_DIR_ENV}=/path/to/folder (the files directly, or in a {name}/ subfolder);",
        "  * put the four original IDX files "
        + ", ".join(IDX_FILES)
        + " into one of the folders listed above.",
    ]
    return "\n".join(lines)


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
):
    """Make sure ``name`` is prepared in the TFDS data dir; return the builder.

    Already prepared: nothing else is needed (no IDX files, no download).
    Otherwise prepare from the first usable local folder, and only if there is
    none try TFDS's online download, turning its failure into one
    :class:`DatasetNotFoundError` that lists every place we looked.
    """
    _check_name(name)
    import tensorflow_datasets as tfds  # lazy: importing it is slow

    root = resolve_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=None if root is None else os.fspath(root))
    if builder.is_prepared():
        return builder
    check_prepare_dependencies()
    data_root = Path(builder.data_dir_root)
    data_root.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (parallel test workers, runs started together): one prepares, the others
    # wait for it and then read what it wrote, instead of writing the same files at the same time.
    with open(data_root / f".{name}.prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = tfds.builder(name, data_dir=None if root is None else os.fspath(root))
        if builder.is_prepared():
            return builder
        return _prepare_unlocked(builder, name, data_root, manual_dir)


def _prepare_unlocked(builder, name: str, data_root: Path, manual_dir):
    """The body of :func:`prepare`, run by the one process that holds the lock."""
    import tensorflow_datasets as tfds

    # Trap 1: one extraction folder per dataset, never the shared default.
    extract_dir = data_root / "downloads" / "extracted" / name
    source, rejected = find_manual_dir(name, data_root, manual_dir, _expected_files(builder))
    _warn_ignored_explicit_sources(rejected)
    if source is not None:
        logger.info("Preparing %s from local IDX files in %s", name, source)
        config = tfds.download.DownloadConfig(
            manual_dir=os.fspath(source), extract_dir=os.fspath(extract_dir), try_download_gcs=False
        )
        builder.download_and_prepare(download_config=config)
        return builder

    # TFDS retries each failed URL 10 times with exponential backoff (about
    # 3.5 minutes offline), so probe the hosts first and fail fast.
    blocker = _download_blocker(builder)
    if blocker is not None:
        raise DatasetNotFoundError(_not_found_message(name, rejected, builder.data_dir, blocker))
    logger.info("No local IDX files for %s; trying TFDS's online download", name)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(extract_dir=os.fspath(extract_dir))
        )
    except Exception as err:  # any failure here means: no data reachable
        raise DatasetNotFoundError(
            _not_found_message(name, rejected, builder.data_dir, err)
        ) from err
    return builder


def _download_blocker(builder) -> str | None:
    """Why an online download cannot work right now, or ``None`` if it might.

    Opens (and closes) a TCP connection to each download host. Skipped when a
    proxy is configured, since then direct connections prove nothing.
    """
    if urllib.request.getproxies():
        return None
    hosts = set()
    for url in getattr(builder, "url_infos", None) or {}:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname:
            hosts.add((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    for host, port in sorted(hosts):
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            return f"not attempted: cannot connect to {host}:{port} ({err})"
    return None


def _warn_ignored_explicit_sources(rejected: list[tuple[ManualDirCandidate, str]]) -> None:
    """Say so when a folder the user named explicitly was unusable.

    Falling through to the next source is safe (TFDS verifies checksums, so any
    source gives identical data) but a silent fall-through hides typos.
    """
    by_origin: dict[str, list[tuple[ManualDirCandidate, str]]] = {}
    for cand, why in rejected:
        by_origin.setdefault(cand.origin, []).append((cand, why))
    for origin in ("argument", "env"):
        entries = by_origin.get(origin, [])
        if len(entries) == 2:  # both the <name>/ subfolder and the folder itself failed
            cand, why = entries[-1]
            logger.warning("Ignoring %s %s: %s", cand.source, cand.path, why)


def _require_tensorflow() -> None:
    if not _module_available("tensorflow"):
        raise ImportError(f"Reading TFDS datasets needs tensorflow; install with: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=8)
def _load_numpy_cached(
    name: str, split: str, data_dir: str | None, manual_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir)
    _require_tensorflow()
    ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False, as_supervised=True)
    images, labels = tfds.as_numpy(ds)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    # The cache hands out the same arrays to every caller: make them read-only.
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_split_numpy(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded split as read-only host arrays: uint8 ``[N, 28, 28, 1]``, int32 ``[N]``.

    Decoded once per (name, split, data_dir, manual_dir) and cached in memory;
    later calls return the very same arrays. Order is TFDS's (see module doc).
    """
    _check_name(name)
    root = resolve_data_dir(data_dir)
    return _load_numpy_cached(
        name,
        split,
        None if root is None else os.fspath(root),
        None if manual_dir is None else os.fspath(Path(manual_dir).expanduser()),
    )


def clear_cache() -> None:
    """Forget decoded splits (tests use it to check that decoding is deterministic)."""
    _load_numpy_cached.cache_clear()


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> Dataset:
    """A whole split on the default device, ready for jitted training.

    Images are float32 in ``[0, 1]`` with shape ``[N, 28, 28, 1]``, labels int32.
    The uint8 pixels are moved to the device first and scaled there (4x less
    host-to-device traffic). ``split`` is any TFDS split string ("train",
    "test", "train[:1000]", ...). See :func:`prepare` for where the IDX files
    are looked for, and the module doc for why examples are not in IDX order.
    """
    images, labels = load_split_numpy(name, split, data_dir=data_dir, manual_dir=manual_dir)
    images = jax.device_put(images).astype(jnp.float32) / 255.0
    return Dataset(images=images, labels=jax.device_put(labels))
