"""Checkpoints with orbax-checkpoint: params, optimizer state, step, RNG and config.

A checkpoint directory holds one orbax step folder per saved epoch, each with
four items: ``params``, ``opt_state``, ``train`` (step and base RNG) and
``meta`` (JSON: the run's config and the parameter signature). Items are
restored separately, so a distillation run can read only a teacher's
``params`` and ``meta``.

Every saved step also holds ``checksums.sha256.json``, the SHA-256 of each of
its files. Before anything is restored the step is verified: a flipped byte
or a truncated file is reported, and a restore that did not ask for one
particular epoch falls back to the newest intact step, saying so
(:class:`CheckpointCorruptWarning`); if none is intact,
:class:`CheckpointCorruptError`. Steps saved before checksums existed are
trusted as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKSUMS = "checksums.sha256.json"


PyTree = Any


def model_signature(params: Any) -> dict[str, list[int]]:
    """Path -> shape of every parameter: what a checkpoint must match to be restored."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another model or configuration."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files do not match the checksums written with it."""


class CheckpointCorruptWarning(UserWarning):
    """The newest checkpoint is corrupted; an older, intact one is used instead."""


def _file_digests(step_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[str(path.relative_to(step_dir))] = digest.hexdigest()
    return out


def _step_dir(directory: Path, epoch: int) -> Path:
    return Path(directory).absolute() / str(int(epoch))


def verify(directory: str | os.PathLike, epoch: int) -> list[str]:
    """What is wrong with a saved step's files (missing, changed or unreadable); ``[]`` when intact or unchecked."""
    step_dir = _step_dir(Path(directory), epoch)
    try:
        stored = json.loads((step_dir / CHECKSUMS).read_text())
    except FileNotFoundError:
        return []  # written before checksums existed
    except (OSError, json.JSONDecodeError) as error:
        return [f"{CHECKSUMS} unreadable ({error})"]
    found = _file_digests(step_dir)
    problems = [f"{name} missing" for name in stored if name not in found]
    problems += [f"{name} changed" for name, digest in stored.items() if name in found and found[name] != digest]
    return problems


def intact_epoch(directory: str | os.PathLike, epoch: int | None = None) -> int:
    """``epoch`` if intact, or (``epoch=None``) the newest intact saved epoch; see the module docstring."""
    directory = Path(directory)
    with _reader(directory) as mngr:
        steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {directory.absolute()}. Train one first "
            "(python -m distill_jax train-teacher ...) or point to a run's checkpoints/ folder."
        )
    if epoch is not None:
        problems = verify(directory, epoch)
        if problems:
            raise CheckpointCorruptError(f"checkpoint epoch {epoch} in {directory.absolute()} is corrupted: {'; '.join(problems)}.")
        return int(epoch)
    corrupted = []
    for step in steps:
        problems = verify(directory, step)
        if not problems:
            if corrupted:
                warnings.warn(
                    f"checkpoint {directory.absolute()}: " + "; ".join(corrupted)
                    + f". Using epoch {step}, the newest intact one.",
                    CheckpointCorruptWarning, stacklevel=3,
                )
            return int(step)
        corrupted.append(f"epoch {step} is corrupted ({', '.join(problems[:3])})")
    raise CheckpointCorruptError(
        f"every checkpoint in {directory.absolute()} is corrupted: " + "; ".join(corrupted)
        + ". Retrain, or restore the folder from a backup."
    )


def _abstract(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
    """Restore targets: shape, dtype and the sharding each array should land with.

    ``shardings`` (a pytree of ``jax.sharding.Sharding`` matching ``tree``)
    overrides the leaves' own; a leaf with neither (e.g. from
    ``jax.eval_shape``) goes to this process's first device. The layout the
    checkpoint was written with never matters: a checkpoint from 8 devices
    (or 2 processes) restores onto 1 device, and one from 1 device onto a
    mesh of 8, each array split as the new layout wants.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(leaf, sharding=None):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):  # Python scalars
            return ocp.utils.to_shape_dtype_struct(leaf)
        sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding if sharding is not None else default)

    if shardings is None:
        return jax.tree_util.tree_map(target, tree)
    return jax.tree_util.tree_map(target, tree, shardings)


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """The manager a run saves with (creates ``directory``); ``read_only``: one that only reads (a finished run)."""
    if read_only:
        return _reader(directory)
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def _reader(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """A read-only manager: reading never creates, deletes or writes anything (a read-only run restores too)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no checkpoint folder {directory}. Point to a run directory (or its checkpoints/ folder) "
            "that a finished or interrupted run wrote."
        )
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None, save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=options)


def latest_epoch(directory: str | os.PathLike) -> int | None:
    """The last saved epoch in ``directory``, or None if there is none."""
    directory = Path(directory)
    if not directory.exists():
        return None
    with _reader(directory) as mngr:
        return mngr.latest_step()


def save(
    mngr: ocp.CheckpointManager,
    epoch: int,
    *,
    params: PyTree,
    opt_state: PyTree,
    step: jax.Array,
    rng: jax.Array,
    meta: dict,
) -> None:
    """Saves one epoch's state and waits until it is on disk.

    Waiting keeps the guarantee simple: once ``save`` returns, a crash cannot
    lose this epoch.
    """
    meta = dict(meta, signature=model_signature(params), epoch=int(epoch))
    mngr.save(
        int(epoch),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            train=ocp.args.StandardSave({"step": step, "rng": rng}),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    mngr.wait_until_finished()
    if jax.process_index() == 0:
        step_dir = _step_dir(Path(str(mngr.directory)), epoch)
        tmp = step_dir / (CHECKSUMS + ".tmp")
        tmp.write_text(json.dumps(_file_digests(step_dir), indent=0, sort_keys=True))
        tmp.replace(step_dir / CHECKSUMS)


def read_meta(directory: str | os.PathLike, epoch: int | None = None) -> dict:
    """The JSON metadata (config, signature, epoch) of a checkpoint."""
    directory = Path(directory)
    epoch = intact_epoch(directory, epoch)
    with _reader(directory) as mngr:
        return mngr.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def check_signature(meta: dict, params_like: PyTree, directory: str | os.PathLike) -> None:
    """Raises CheckpointMismatchError if the checkpoint's parameters differ in shape."""
    stored = meta.get("signature", {})
    wanted = model_signature(params_like)
    if stored != wanted:
        only_stored = {k: v for k, v in stored.items() if wanted.get(k) != v}
        only_wanted = {k: v for k, v in wanted.items() if stored.get(k) != v}
        raise CheckpointMismatchError(
            f"checkpoint {Path(directory).absolute()} was written by another model config.\n"
            f"  in the checkpoint: {only_stored}\n  this config expects: {only_wanted}\n"
            f"  checkpoint model config: {meta.get('config', {}).get('model')}\n"
            "Use the config that wrote it, or a new workdir."
        )


def restore_params(
    directory: str | os.PathLike, params_like: PyTree, epoch: int | None = None, *, shardings: PyTree | None = None
) -> PyTree:
    """Restores only the parameters (e.g. a teacher's), checking their shapes first.

    ``shardings``: where the arrays should land (default: ``params_like``'s
    shardings, or this process's first device).
    """
    meta = read_meta(directory, epoch)
    check_signature(meta, params_like, directory)
    with _reader(directory) as mngr:
        restored = mngr.restore(
            meta["epoch"],
            args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like, shardings))),
        )
    return restored.params


def restore_all(
    directory: str | os.PathLike,
    *,
    params_like: PyTree,
    opt_state_like: PyTree,
    train_like: dict,
    epoch: int | None = None,
    shardings: dict | None = None,
) -> tuple[dict, PyTree, PyTree, dict]:
    """Restores ``(meta, params, opt_state, {"step", "rng"})`` for resuming.

    ``shardings``: optional ``{"params", "opt_state", "train"}`` pytrees of
    target shardings (default: those of the ``*_like`` arrays), so a run
    resumes on another mesh or device count with its arrays laid out anew.
    """
    shardings = shardings or {}
    meta = read_meta(directory, epoch)
    check_signature(meta, params_like, directory)
    with _reader(directory) as mngr:
        restored = mngr.restore(
            meta["epoch"],
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params_like, shardings.get("params"))),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state_like, shardings.get("opt_state"))),
                train=ocp.args.StandardRestore(_abstract(train_like, shardings.get("train"))),
            ),
        )
    return meta, restored.params, restored.opt_state, restored.train
