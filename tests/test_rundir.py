"""The run directory (distill_jax.training.rundir): reuse rules, truncation on resume, TensorBoard events."""

from __future__ import annotations

import json
import struct

import pytest

from distill_jax.training import checkpoint as ckpt
from distill_jax.training import rundir


def _events(directory) -> list:
    """Every Event of the TensorBoard files in ``directory``, read from the TFRecord framing by hand."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            out.append(event)
            pos += 12 + length + 4
    return out


def _scalars(directory) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in _events(directory) for v in e.summary.value}


def test_config_differences_name_every_nested_change_and_skip_what_may_change():
    stored = {"model": {"hidden": [800, 800], "dropout": 0.5}, "seed": 0, "mesh": "data=1"}
    now = {"model": {"hidden": [800, 800], "dropout": 0.2}, "seed": 1, "mesh": "data=8", "extra": True}
    assert rundir.config_differences(stored, now, may_change=("mesh",)) == [
        "extra: stored None vs now True", "model.dropout: stored 0.5 vs now 0.2", "seed: stored 0 vs now 1"]
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"run X was written with another config:\n  seed: .*\nfix it"):
        rundir.check_same_config({"seed": 0}, {"seed": 1}, what="run X", fix="fix it")
    rundir.check_same_config(stored, dict(stored, mesh="fsdp=8"), what="run X", may_change=("mesh",), fix="")


def test_fingerprint_ignores_the_named_keys_and_the_order():
    a = rundir.fingerprint({"seeds": [0, 1], "b": {"y": 1, "x": 2}, "a": 1}, ignore=("seeds",))
    assert a == rundir.fingerprint({"a": 1, "b": {"x": 2, "y": 1}, "seeds": [5]}, ignore=("seeds",))
    assert a != rundir.fingerprint({"a": 2, "b": {"x": 2, "y": 1}}, ignore=("seeds",))


def test_write_json_leaves_no_temporary_file(tmp_path):
    rundir.write_json(tmp_path / "r.json", {"a": 1})
    rundir.write_json(tmp_path / "r.json", {"a": 2})
    assert rundir.read_json(tmp_path / "r.json") == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_metrics_log_truncates_on_resume_and_writes_tensorboard_scalars(tmp_path):
    def record(epoch, loss):
        return {"epoch": epoch, "step": 10 * epoch, "epoch_time_s": 1.5, "train": {"loss": loss, "flag": True},
                "test": {"errors": 7 * epoch, "per_class": [1, 2]}, "note": "text"}

    with rundir.MetricsLog(tmp_path) as log:
        for epoch in (1, 2, 3):
            log.append(record(epoch, 1.0 / epoch))
    assert [line["epoch"] for line in log.lines()] == [1, 2, 3]
    assert rundir.training_time_s(tmp_path) == 4.5
    scalars = _scalars(tmp_path)
    assert scalars[("train/loss", 20)] == pytest.approx(0.5) and scalars[("test/errors", 30)] == 21
    assert scalars[("test/per_class/1", 10)] == 2 and scalars[("epoch_time_s", 10)] == 1.5
    assert not any(tag.startswith(("train/flag", "note", "epoch", "step")) for tag, _ in scalars if tag != "epoch_time_s")

    # Resumed from epoch 1's checkpoint: lines 2 and 3 are dropped; TensorBoard is told to purge steps >= 10.
    with rundir.MetricsLog(tmp_path, resume_from=1, purge_step=10) as log:
        log.append(record(2, 0.25))
    assert [(line["epoch"], line["train"]["loss"]) for line in log.lines()] == [(1, 1.0), (2, 0.25)]
    starts = [e.step for e in _events(tmp_path) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [10]
    assert rundir.training_time_s(tmp_path) == 3.0

    # A fresh start (no checkpoint to resume): both the lines and the old event files go.
    with rundir.MetricsLog(tmp_path) as log:
        log.append(record(1, 9.0))
    assert [line["train"]["loss"] for line in log.lines()] == [9.0]
    assert _scalars(tmp_path)[("train/loss", 10)] == 9.0 and ("train/loss", 20) not in _scalars(tmp_path)


def test_a_run_writes_tensorboard_events_and_a_reused_run_keeps_its_training_time(tmp_path):
    import sharding_worker

    from distill_jax import training

    small_mnist = sharding_worker.synthetic_datasets()
    config = training.default_config()
    config.model.hidden = (32,)
    config.num_epochs = 2
    config.batch_size = 64
    first = training.run(config, tmp_path, datasets=small_mnist, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first["wall_time_s"] == pytest.approx(sum(line["epoch_time_s"] for line in lines), abs=0.01)
    scalars = _scalars(tmp_path)
    for line in lines:
        assert scalars[("train/loss", line["step"])] == pytest.approx(line["train"]["loss"])
        assert scalars[("test/errors", line["step"])] == line["test"]["errors"]
    again = training.run(config, tmp_path, datasets=small_mnist, progress=False, resume=True)
    assert again["wall_time_s"] == first["wall_time_s"]
    assert rundir.read_json(tmp_path / "results.json")["wall_time_s"] == first["wall_time_s"]
