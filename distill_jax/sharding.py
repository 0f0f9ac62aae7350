"""Sharding across devices and hosts: meshes, partition rules, sharded data.

The run loop (:func:`distill_jax.training.run`) lays everything out on a
device mesh built from ``config.mesh``:

* ``make_mesh("data=4,model=2")``: a :class:`jax.sharding.Mesh` with named
  axes ``data`` (data parallel: the batch is split), ``fsdp`` (fully-sharded
  parameters, ZeRO-3 style; the batch is split over it too) and ``model``
  (tensor parallel). ``-1`` for one axis takes the remaining devices.
* Partition rules ``[(regex, PartitionSpec), ...]`` (first match wins,
  matched with ``re.search`` against ``jax.tree_util.keystr`` of each
  parameter's path, e.g. ``"['params']['hidden_0']['kernel']"``) map a
  params pytree to a pytree of :class:`~jax.sharding.NamedSharding`. Presets
  ``"replicated"``, ``"fsdp"`` and ``"tensor"`` expand into such rules for a
  given params tree; teacher and student have their own rules.
* Optimizer state mirrors the student's parameters; batches are split over
  the data axes; :func:`distill_jax.training.steps.make_train_epoch` jits
  the scanned epoch with explicit in/out shardings from a
  :class:`~distill_jax.training.steps.Layout` built of these pieces.

This module knows meshes, specs and arrays only; it imports nothing of
``distill_jax``, so any training code (ours or a notebook's) can use it.

A single device is the same code on a 1-device mesh.

**Specs that do not fit.** A mesh axis (or group of axes) whose size does not
divide the dimension it would shard falls back to *replicated for that
dimension* (logged at INFO level); axes of the known names that the mesh does
not have are dropped (size 1). So the ``tensor`` preset on a ``data=8`` mesh,
or the 10-way logits layer on ``model=8``, is replicated rather than an XLA
error. Unknown axis names, a spec longer than the array's rank and an axis
used twice in one spec are ``ValueError``.

**Data across processes.** The training set lives on the devices for the
whole run and each step gathers its batch inside the jitted scan. With a
mesh, the (padded) training arrays are global ``jax.Array`` s sharded along
the example axis over the data axes (:func:`row_sharding`); each process
builds its part from only the rows its own devices hold
(:func:`process_row_range`, :func:`shard_rows`, via
``jax.make_array_from_process_local_data``). The epoch's permutation is drawn
from the replicated RNG, so all processes agree on it, and the gather of a
batch happens under jit on the global array: as compiled on CPU, XLA gathers
on each data shard the rows it owns and sums the (masked) pieces across the
data axes, so a step moves one batch between devices, never the dataset. Each batch is then
constrained to the data sharding. Because the order of examples is the
global one, a sharded run follows the single-device run (same batches, same
updates, up to float reassociation in cross-device sums).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

P = PartitionSpec
PyTree = Any
Rule = tuple[str, PartitionSpec]

AXES = ("data", "fsdp", "model")
DATA_AXES = ("data", "fsdp")
DEFAULT_MESH = "data=-1"
PRESETS = ("replicated", "fsdp", "tensor")
_KERNEL_NAMES = ("kernel", "embedding")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ meshes


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=4,model=2"`` (or a dict) -> ``{"data": 4, "model": 2}``, order kept; sizes may be -1."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = DEFAULT_MESH
    if isinstance(spec, str):
        items = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            name, sep, size = part.partition("=")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: expected 'axis=size' items like 'data=4,model=2', got {part!r}.")
            items.append((name, size))
    else:
        items = list(dict(spec).items())
    axes: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}.")
        if name in axes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice.")
        try:
            size = int(size)
        except (TypeError, ValueError):
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {size!r}.") from None
        if size == 0 or size < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1 (fill), got {size}.")
        axes[name] = size
    if not axes:
        raise ValueError(f"mesh spec {spec!r} names no axis.")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1.")
    return axes


def make_mesh(spec: str | Mapping[str, int] | None = DEFAULT_MESH, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) from a spec like ``"data=2,fsdp=2,model=2"``.

    Axis order is the spec's (the first axis is the outermost: on several
    hosts, put ``data`` first so that the model axes stay within a host).
    The product of the sizes must equal the number of devices; ``-1`` fills.
    """
    axes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    known = math.prod(v for v in axes.values() if v != -1)
    if -1 in axes.values():
        if n % known:
            raise ValueError(
                f"mesh {spec!r}: the fixed axes use {known} devices, which does not divide the {n} available."
            )
        axes = {k: (n // known if v == -1 else v) for k, v in axes.items()}
    total = math.prod(axes.values())
    if total != n:
        raise ValueError(
            f"mesh {spec!r} needs {total} devices but {n} are available; make the sizes multiply to {n} "
            "or use -1 for one axis (e.g. 'data=-1,model=2')."
        )
    shape, names = tuple(axes.values()), tuple(axes)
    axis_types = (AxisType.Auto,) * len(names)
    try:  # topology-aware device order where the platform has one (TPU)
        return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)
    except Exception:  # noqa: BLE001 - any layout jax cannot place: plain order
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), names, axis_types=axis_types)


def data_axes(mesh) -> tuple[str, ...]:
    """The mesh axes the batch (and the example axis of the data) is split over."""
    return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def batch_spec(mesh) -> PartitionSpec:
    """``P(('data', 'fsdp'))`` with an fsdp axis, ``P('data')`` without; ``P()`` with neither."""
    axes = data_axes(mesh)
    if not axes:
        return P()
    return P(axes[0] if len(axes) == 1 else axes)


def num_data_shards(mesh) -> int:
    return math.prod(dict(mesh.shape)[a] for a in data_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batches and of the training arrays: leading (example) axis over the data axes."""
    return NamedSharding(mesh, batch_spec(mesh))


# ------------------------------------------------------------------ partition rules


def _parse_spec_entry(entry) -> Any:
    if entry is None:
        return None
    if isinstance(entry, str):
        entry = entry.strip()
        if entry in ("", "None", "none", "_"):
            return None
        parts = tuple(p for p in entry.split("+") if p)
        return parts[0] if len(parts) == 1 else parts
    if isinstance(entry, (tuple, list)):
        parts = tuple(str(p) for p in entry if p is not None)
        return None if not parts else parts[0] if len(parts) == 1 else parts
    raise ValueError(f"bad PartitionSpec entry {entry!r}: use None, an axis name or a tuple of axis names.")


def to_spec(spec) -> PartitionSpec:
    """A PartitionSpec from a PartitionSpec, a tuple/list (as JSON stores it) or a string like ``"None,model"``."""
    if isinstance(spec, PartitionSpec):
        return spec
    if isinstance(spec, str):
        spec = spec.strip()
        return P() if spec in ("", "()", "P()") else P(*(_parse_spec_entry(e) for e in spec.split(",")))
    if isinstance(spec, (tuple, list)):
        return P(*(_parse_spec_entry(e) for e in spec))
    raise ValueError(f"bad PartitionSpec {spec!r}.")


def parse_rules(rules) -> list:
    """Normalizes rules to a list whose items are preset names or ``(regex, PartitionSpec)`` pairs.

    Accepts a preset name (``"fsdp"``), a list of items, or a string of
    ``;``-separated items where an item is a preset name or
    ``regex=spec`` with ``spec`` comma-separated per dimension (``None``
    for unsharded, ``data+fsdp`` for two axes), e.g.
    ``"logits=;hidden_.*kernel=None,model;replicated"`` (``logits=`` with an
    empty spec: replicated).
    """
    if rules is None:
        return ["replicated"]
    if isinstance(rules, str):
        items = [item.strip() for item in rules.split(";") if item.strip()]
        out: list = []
        for item in items:
            if item in PRESETS:
                out.append(item)
            elif "=" in item:
                regex, spec = item.rsplit("=", 1)
                out.append((regex, to_spec(spec)))
            else:
                raise ValueError(
                    f"partition rule {item!r}: expected a preset ({', '.join(PRESETS)}) or 'regex=spec'."
                )
        return out or ["replicated"]
    out = []
    for item in rules:
        if isinstance(item, str):
            out.extend(parse_rules(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            re.compile(item[0])
            out.append((item[0], to_spec(item[1])))
        else:
            raise ValueError(f"partition rule {item!r}: expected a preset name or a (regex, spec) pair.")
    return out


def _flat_paths(tree: PyTree) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _leaf_name(path: str) -> str:
    match = re.search(r"\['([^']*)'\]$", path)
    return match.group(1) if match else ""


def _parent(path: str) -> str:
    return re.sub(r"\['[^']*'\]$", "", path)


def _exact(path: str) -> str:
    return "^" + re.escape(path) + "$"


def _fsdp_rules(params: PyTree, mesh) -> list[Rule]:
    sizes = dict(mesh.shape)
    axis = "fsdp" if "fsdp" in sizes else "data" if "data" in sizes else None
    rules: list[Rule] = []
    if axis is not None:
        k = sizes[axis]
        for path, leaf in _flat_paths(params):
            if _leaf_name(path) not in _KERNEL_NAMES:
                continue
            shape = tuple(leaf.shape)
            dims = [d for d in range(len(shape)) if shape[d] % k == 0]
            if dims:
                d = max(dims, key=lambda i: (shape[i], -i))  # largest; the first of equals
                rules.append((_exact(path), P(*([None] * d + [axis]))))
    return rules + [(".*", P())]


def _tensor_rules(params: PyTree, mesh) -> list[Rule]:
    flat = _flat_paths(params)
    kernels = sorted((p for p, leaf in flat if _leaf_name(p) in _KERNEL_NAMES and len(leaf.shape) >= 2), key=_natural_key)
    shapes = dict(flat)
    rules: list[Rule] = []
    for i, path in enumerate(kernels):
        ndim = len(shapes[path].shape)
        bias = _parent(path) + "['bias']"
        if i % 2 == 0:  # column-parallel: outputs split, so is the bias
            rules.append((_exact(path), P(*([None] * (ndim - 1) + ["model"]))))
            rules.append((_exact(bias), P("model")))
        else:  # row-parallel: inputs split, outputs summed; the bias is whole
            rules.append((_exact(path), P(*([None] * (ndim - 2) + ["model", None]))))
            rules.append((_exact(bias), P()))
    return rules + [(".*", P())]


def resolve_rules(rules, params: PyTree, mesh) -> list[Rule]:
    """Expands presets into ``(regex, PartitionSpec)`` rules for this params tree and mesh.

    Presets cover every parameter (they end with a catch-all ``(".*", P())``),
    so rules meant to override one must come before it:

    * ``replicated``: every parameter whole on every device.
    * ``fsdp``: each kernel's largest dimension divisible by the ``fsdp``
      axis (the ``data`` axis when the mesh has no ``fsdp``) is split over it;
      biases replicated. ZeRO-3: with data parallelism over the same axis,
      XLA all-gathers a kernel where it is used and reduce-scatters its grad.
    * ``tensor``: Megatron-style MLP. Kernels, in the natural order of their
      paths, alternate column-parallel ``P(None, 'model')`` (bias
      ``P('model')``) and row-parallel ``P('model', None)`` (bias whole), so
      a hidden activation stays split between the two and one all-reduce per
      pair sums the row-parallel outputs. Conv kernels split their last
      (output) or second-to-last (input) dimension the same way.
    """
    out: list[Rule] = []
    for item in parse_rules(rules):
        if item == "replicated":
            out.append((".*", P()))
        elif item == "fsdp":
            out.extend(_fsdp_rules(params, mesh))
        elif item == "tensor":
            out.extend(_tensor_rules(params, mesh))
        else:
            out.append(item)
    return out


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh, *, name: str = "array") -> PartitionSpec:
    """``spec`` made valid for an array of ``shape`` on ``mesh``.

    Dimensions whose mesh-axis size does not divide them become unsharded,
    axes (of the known names) missing from the mesh are dropped, trailing
    ``None`` s are removed. Unknown axes, a spec longer than the rank and an
    axis used twice raise ``ValueError``.
    """
    sizes = dict(mesh.shape)
    shape = tuple(shape)
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} of {name} has {len(spec)} entries but the array has shape {shape}.")
    used: set[str] = set()
    entries: list[Any] = []
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = []
        for axis in axes:
            if axis not in AXES and axis not in sizes:
                raise ValueError(f"partition spec {spec} of {name}: unknown mesh axis {axis!r}; the axes are {AXES}.")
            if axis in used:
                raise ValueError(f"partition spec {spec} of {name} uses mesh axis {axis!r} twice.")
            used.add(axis)
            if axis in sizes:
                kept.append(axis)
        size = math.prod(sizes[a] for a in kept)
        if kept and shape[dim] % size:
            log.info("%s: dim %d (size %d) is not divisible by %s=%d; replicated along it.", name, dim, shape[dim], "+".join(kept), size)
            kept = []
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def partition_specs(params: PyTree, rules, mesh) -> PyTree:
    """A pytree of fitted PartitionSpecs, one per leaf of ``params``: first matching rule wins, none is replicated."""
    resolved = [(re.compile(regex), spec) for regex, spec in resolve_rules(rules, params, mesh)]

    def spec_of(path, leaf):
        name = jax.tree_util.keystr(path)
        for regex, spec in resolved:
            if regex.search(name):
                return fit_spec(spec, np.shape(leaf), mesh, name=name)
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, params)


def param_shardings(params: PyTree, rules, mesh: Mesh) -> PyTree:
    """A pytree of NamedSharding for ``params`` (arrays or ShapeDtypeStructs) under ``rules``."""
    specs = partition_specs(params, rules, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def opt_state_shardings(opt_state: PyTree, params: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for an optax state that mirror the parameters'.

    A state leaf whose path ends with a parameter's path and has its shape
    (momentum ``trace``, Adam ``mu``/``nu``, ...) gets that parameter's
    sharding; failing that, a leaf with the shape of exactly one parameter
    sharding gets it; everything else (counts, scalars) is replicated.
    """
    param_paths = [p for p, _ in _flat_paths(params)]
    param_shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params)]
    param_sh = jax.tree_util.tree_leaves(shardings)
    entries = sorted(zip(param_paths, param_shapes, param_sh), key=lambda e: -len(e[0]))
    by_shape: dict[tuple, set] = {}
    for _, shape, sh in entries:
        by_shape.setdefault(shape, set()).add(sh)
    rep = replicated(mesh)

    def sharding_of(path, leaf):
        name, shape = jax.tree_util.keystr(path), tuple(np.shape(leaf))
        for p, s, sh in entries:
            if s == shape and name.endswith(p):
                return sh
        candidates = by_shape.get(shape, set())
        if shape and len(candidates) == 1:
            return next(iter(candidates))
        return rep

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def train_state_shardings(state: Any, shardings: PyTree, mesh: Mesh) -> Any:
    """Shardings of a ``TrainState``: params per rules, optimizer state mirrored, step and rng replicated."""
    rep = replicated(mesh)
    return type(state)(
        step=rep,
        params=shardings,
        opt_state=opt_state_shardings(state.opt_state, state.params, shardings, mesh),
        rng=rep,
    )


def specs_of(tree: PyTree) -> dict[str, PartitionSpec]:
    """Path -> ``.sharding.spec`` of every leaf (for logs and tests)."""
    return {path: leaf.sharding.spec for path, leaf in _flat_paths(tree)}


# ------------------------------------------------------------------ data


def padded_num_rows(num_rows: int, mesh: Mesh) -> int:
    """``num_rows`` rounded up to a multiple of the number of data shards."""
    k = num_data_shards(mesh)
    return -(-num_rows // k) * k


def process_row_range(mesh: Mesh, num_rows: int) -> tuple[int, int] | None:
    """``(lo, hi)``: the rows of a row-sharded ``[num_rows, ...]`` array held by this process's devices.

    ``None`` if they are not one contiguous block (then :func:`shard_rows`
    slices the full array instead).
    """
    index_map = row_sharding(mesh).addressable_devices_indices_map((num_rows,))
    spans = sorted({(s[0].start or 0, num_rows if s[0].stop is None else s[0].stop) for s in index_map.values()})
    lo, hi = spans[0]
    for start, stop in spans[1:]:
        if start > hi:
            return None
        hi = max(hi, stop)
    return lo, hi


def from_process_rows(local_rows: np.ndarray, mesh: Mesh, num_rows: int) -> jax.Array:
    """The global row-sharded array from this process's rows ``process_row_range(mesh, num_rows)``.

    For loaders that read only their own part of the data.
    """
    local_rows = np.asarray(local_rows)
    return jax.make_array_from_process_local_data(row_sharding(mesh), local_rows, (num_rows,) + local_rows.shape[1:])


def shard_rows(array, mesh: Mesh, num_rows: int | None = None) -> jax.Array:
    """A row-sharded global array of ``array`` (the full data, identical on every process), zero-padded to ``num_rows``.

    Each process hands JAX only the rows its devices hold.
    """
    array = np.asarray(array)
    num_rows = padded_num_rows(array.shape[0], mesh) if num_rows is None else num_rows
    if num_rows != array.shape[0]:
        array = np.concatenate([array, np.zeros((num_rows - array.shape[0],) + array.shape[1:], array.dtype)])
    span = process_row_range(mesh, num_rows)
    if span is None:
        return jax.make_array_from_callback(array.shape, row_sharding(mesh), lambda idx: array[idx])
    lo, hi = span
    return from_process_rows(array[lo:hi], mesh, num_rows)


def replicate(array, mesh: Mesh) -> jax.Array:
    """A global array replicated on every device of ``mesh`` (``array`` identical on every process)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda idx: array[idx])


def count_nonfinite(array: jax.Array) -> int:
    """Number of NaN/inf entries of a (possibly multi-process) array, computed on device."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        arr = np.asarray(array)
        return int(arr.size - np.count_nonzero(np.isfinite(arr)))
    out = NamedSharding(array.sharding.mesh, P())
    return int(jax.jit(lambda x: jnp.sum(~jnp.isfinite(x)), out_shardings=out)(array))


def gather_to_host(tree: PyTree) -> PyTree:
    """Numpy copies of (possibly multi-process) global arrays, identical on every process."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


__all__ = [
    "AXES",
    "DATA_AXES",
    "DEFAULT_MESH",
    "PRESETS",
    "batch_spec",
    "count_nonfinite",
    "data_axes",
    "fit_spec",
    "from_process_rows",
    "gather_to_host",
    "make_mesh",
    "num_data_shards",
    "opt_state_shardings",
    "padded_num_rows",
    "param_shardings",
    "parse_mesh_spec",
    "parse_rules",
    "partition_specs",
    "process_row_range",
    "replicate",
    "replicated",
    "resolve_rules",
    "row_sharding",
    "shard_rows",
    "specs_of",
    "to_spec",
    "train_state_shardings",
]
