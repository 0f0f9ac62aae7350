"""The run directory: what a run writes, and the rules that decide when a directory may be reused.

Every run (a single run of :func:`distill_jax.training.run`, a population of
students, a study's stage) owns one directory::

  config.json         the config that the run was started with
  metrics.jsonl       one JSON line per epoch
  events.out.tfevents.*  the same metrics for TensorBoard (``tensorboard --logdir runs/``)
  results.json        the final results, with the run's training time
  checkpoints/        orbax checkpoints (distill_jax.training.checkpoint)

Reuse rules, implemented once here:

* **the config fingerprint**: a directory is resumed or reused only by the
  config that wrote it, up to keys that cannot change the result
  (:func:`config_differences`, :func:`check_same_config`, :func:`fingerprint`);
* **truncation on resume**: lines and events past the checkpoint a run
  resumes from are dropped, since they are redone (:class:`MetricsLog`);
* **wall time**: a run's training time is the sum of its logged epoch times
  (:func:`training_time_s`), so a reused run reports the time of the run that
  trained it, and a resumed one the time of all its parts.

JSON files are written atomically (:func:`write_json`): an interrupted write
never leaves half a file behind.

Ownership, also here: a run holds ``.lock`` in its directory for as long as
it runs (:func:`owned`; an ``flock``, which the kernel releases when the
process dies, so a crashed run never leaves it stuck), so a second run on the
same directory fails at once; and a directory that holds files but is not a
run directory, or a run whose results would be lost, is refused before
anything is written (:func:`check_workdir`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from distill_jax.training.checkpoint import CheckpointMismatchError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
LOCK = ".lock"
MARKER = ".distill-jax-run"  # written when a run takes a directory: "this is one of ours"


class WorkdirError(ValueError):
    """A workdir that this run may not write into (not a run directory, or a run that would be lost)."""


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""

__all__ = [
    "CONFIG",
    "METRICS",
    "RESULTS",
    "MetricsLog",
    "WorkdirBusyError",
    "WorkdirError",
    "check_same_config",
    "check_workdir",
    "is_run_dir",
    "owned",
    "config_differences",
    "fingerprint",
    "read_json",
    "training_time_s",
    "write_json",
]


def config_differences(stored: Mapping, current: Mapping, *, may_change: Iterable[str] = (), prefix: str = "") -> list[str]:
    """``"key: stored X vs now Y"`` for every (nested) key whose value differs; top-level ``may_change`` keys are skipped."""
    may_change = tuple(may_change)
    diffs = []
    for key in sorted(set(stored) | set(current)):
        if not prefix and key in may_change:
            continue
        a, b = stored.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: stored {a!r} vs now {b!r}")
    return diffs


def check_same_config(stored: Mapping, current: Mapping, *, what: str, may_change: Iterable[str] = (), fix: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming every difference when ``what`` was written by another config."""
    diffs = config_differences(stored, current, may_change=may_change)
    if diffs:
        raise CheckpointMismatchError(f"{what} was written with another config:\n  " + "\n  ".join(diffs) + f"\n{fix}")


def fingerprint(config: Mapping, *, ignore: Iterable[str] = ()) -> str:
    """The config as one canonical string, top-level ``ignore`` keys left out: equal strings, same results."""
    ignore = set(ignore)
    return json.dumps({k: v for k, v in config.items() if k not in ignore}, sort_keys=True, default=list)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Writes ``value`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=indent, sort_keys=sort_keys))
    tmp.replace(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory of this library (its marker, or, for older runs, a config with metrics or checkpoints)."""
    path = Path(path)
    return (path / MARKER).exists() or ((path / CONFIG).exists() and ((path / METRICS).exists() or (path / "checkpoints").is_dir()))


def check_workdir(workdir: str | os.PathLike, *, resume: bool, has_checkpoint: bool) -> None:
    """Refuses, before anything is written, a workdir this run must not take.

    * a directory that holds files but is not a run directory (someone else's);
    * a run without checkpoints that already wrote ``results.json`` (its
      checkpoints were deleted: restarting would replace its results);
    * without ``resume``, a run that logged epochs but stopped before its
      first checkpoint.
    """
    workdir = Path(workdir)
    if not workdir.exists() or has_checkpoint:
        return
    if not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory.")
    contents = sorted(p.name for p in workdir.iterdir() if p.name != LOCK)
    if not contents:
        return
    if not is_run_dir(workdir):
        raise WorkdirError(
            f"{workdir} holds files ({', '.join(contents[:5])}{', ...' if len(contents) > 5 else ''}) but is not a "
            "distill-jax run directory; nothing is written into it. Choose an empty or new --workdir."
        )
    if (workdir / RESULTS).exists():
        raise WorkdirError(
            f"{workdir} holds the results.json of a finished run but no checkpoint (checkpoints/ was deleted or "
            "pruned), so it can be neither resumed nor checked. Choose another --workdir, or delete this one."
        )
    if not resume and _read_lines(workdir / METRICS):
        raise WorkdirError(
            f"{workdir} holds a run that logged epochs but stopped before its first checkpoint. Pass --resume to "
            "start it over in place, or choose another --workdir."
        )


@contextlib.contextmanager
def owned(workdir: str | os.PathLike, *, enabled: bool = True, read_only: bool = False) -> Iterator[Path]:
    """Holds ``workdir/.lock`` for the duration: a second run on the same workdir gets :class:`WorkdirBusyError`.

    The lock is an ``flock`` on the file, which the kernel drops when the
    holder exits or is killed: a crashed run never leaves the workdir stuck.
    The file names the holder (host, pid, start time) for the error message.
    ``enabled=False`` (processes other than the writer) only creates the folder.
    ``read_only=True`` (re-evaluating a finished run) takes a shared lock and
    writes nothing, so readers run side by side and on read-only folders,
    while a writer still excludes them.
    """
    workdir = Path(workdir)
    if read_only:
        yield from _shared(workdir, enabled)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    if not enabled:
        yield workdir
        return
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirBusyError(
                f"{workdir} is in use by another run ({holder}). Wait for it to finish, or use another --workdir."
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        (workdir / MARKER).touch()
        yield workdir
    finally:
        os.close(fd)  # closing drops the flock


def _shared(workdir: Path, enabled: bool) -> Iterator[Path]:
    if not enabled or not (workdir / LOCK).exists():  # a run from before locks, or another process: nothing to share
        yield workdir
        return
    fd = os.open(workdir / LOCK, os.O_RDONLY)  # flock needs no write access
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirBusyError(f"{workdir} is being written by another run ({holder}). Wait for it to finish.") from None
        yield workdir
    finally:
        os.close(fd)


def _read_lines(path: Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a crash mid-write, before that epoch's checkpoint) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise WorkdirError(f"{path}, line {i + 1}, is not JSON ({line[:60]!r}); the metrics file is damaged.") from None
    return records


def training_time_s(workdir: str | os.PathLike) -> float | None:
    """The sum of the logged epoch times of the run in ``workdir`` (None before its first epoch)."""
    lines = _read_lines(Path(workdir) / METRICS)
    if not lines:
        return None
    return round(sum(float(line.get("epoch_time_s", 0.0)) for line in lines), 2)


def _scalars(record: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    """Numeric leaves of a (nested) record as ``("train/loss", value)``; short lists per index."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _scalars(value, name + "/")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            yield name, float(value)
        elif isinstance(value, (list, tuple)) and len(value) <= 64 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            for i, v in enumerate(value):
                yield f"{name}/{i}", float(v)


class MetricsLog:
    """``metrics.jsonl`` and its TensorBoard events in one run directory.

    Open it once per invocation with ``resume_from`` the epoch the run
    starts from: lines past it are dropped, as are TensorBoard events at or
    after ``purge_step`` (tensorboardX's purge of a restarted run), so a
    resumed run's logs read as an uninterrupted one's. ``resume_from=0``
    starts both afresh. ``enabled=False`` (a process other than the one
    that writes files) makes every call a no-op.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_from: int = 0,
        purge_step: int | None = None,
        step_key: str = "step",
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.path = Path(workdir) / METRICS
        self.step_key = step_key
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _read_lines(self.path) if line["epoch"] <= resume_from]
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            if not resume_from:  # a fresh start: old event files are another run's
                for old in self.path.parent.glob("events.out.tfevents.*"):
                    old.unlink()
            self._writer = SummaryWriter(str(self.path.parent), purge_step=purge_step if resume_from else None)

    def append(self, record: Mapping[str, Any]) -> None:
        """One line (an epoch's record, with ``"epoch"``), and its numbers as TensorBoard scalars at ``record[step_key]``."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = int(record.get(self.step_key, record["epoch"]))
            for name, value in _scalars({k: v for k, v in record.items() if k not in ("epoch", "step")}):
                if math.isfinite(value):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def lines(self) -> list[dict]:
        return _read_lines(self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
