"""The example custom task trains (issue 20 item 1), logging to every tracker at once (item 2): a wandb run in
offline mode and an mlflow file store hold the same scalars as metrics.jsonl and eval.jsonl, read back
from their own files (wandb's offline run log, mlflow's tracking client)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest

from test_custom_task import REPO, _example_overrides
from tracerl.runlog import read_jsonl

def wandb_offline_records(run_file: Path) -> list:
    """The protobuf records of a wandb offline run file (run-<id>.wandb). wandb 0.31 ships no Python reader
    (its `sdk.internal.datastore` is gone), so this reads the format itself: a 7-byte header (":W&B", magic,
    version), then 32 KiB blocks of chunks, each a little-endian CRC-32 of (type byte + data), a 2-byte
    length and a type (1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a chunk header is
    padding. Every CRC is checked."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        assert zlib.crc32(bytes([kind]) + data) == crc, f"bad CRC at byte {pos}"
        if kind in (1, 2):
            pending = data
        else:
            pending += data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the wandb offline run under RUN_DIR/wandb (the history records)."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out: dict[int, dict[str, float]] = {}
    for record in wandb_offline_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = row.pop("_step")
            out.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return out


def mlflow_history(uri: str, project: str) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the one run in experiment `project` of the mlflow store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(project).experiment_id])
    assert len(runs) == 1
    out: dict[int, dict[str, float]] = {}
    for key in runs[0].data.metrics:
        for m in client.get_metric_history(runs[0].info.run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return out, runs[0]


def jsonl_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of metrics.jsonl (train/<key>) and eval.jsonl (eval/<split>/<key>): the finite numbers."""
    out: dict[int, dict[str, float]] = {}
    for name, prefix in (("metrics.jsonl", lambda r: "train"), ("eval.jsonl", lambda r: f"eval/{r['split']}")):
        for row in read_jsonl(run_dir / name):
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    out.setdefault(row["step"], {})[f"{prefix(row)}/{k}"] = float(v)
    return out


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """The example task (examples/calculator) for 2 steps, logging to every logger."""
    from tracerl.train import train

    tmp = tmp_path_factory.mktemp("trackers")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp), "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "MLFLOW_TRACKING_URI": f"file:{tmp / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.chdir(REPO)
        run_dir, result = train("examples/calculator/config.yaml",
                                [*_example_overrides(tmp / "run"), "trainer.eval_at_start=true", "trainer.eval_every=1",
                                 "trainer.loggers=[console,jsonl,tensorboard,wandb,mlflow]", "trainer.project=byo"],
                                log=lambda *_: None)
    return run_dir, result, env["MLFLOW_TRACKING_URI"]


def test_the_example_task_trains_a_few_steps(example_run):
    run_dir, result, _ = example_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["trajectories"] == 8 and r["reward_errors"] == 0 for r in rows)
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2] and evals[-1]["n"] == 4
    assert (run_dir / "report.html").is_file() and result["n"] == 4


def test_wandb_offline_and_mlflow_file_runs_hold_the_scalars_of_metrics_jsonl(example_run):
    run_dir, _, uri = example_run
    expected = jsonl_scalars(run_dir)
    assert sorted(expected) == [0, 1, 2] and len(expected[1]) > 30 and "eval/validation/em" in expected[2]
    wandb = wandb_history(run_dir)
    mlflow, run = mlflow_history(uri, "byo")
    assert wandb.keys() == mlflow.keys() == expected.keys()
    for step, values in expected.items():
        assert wandb[step].keys() == values.keys(), (step, set(wandb[step]) ^ set(values))
        assert mlflow[step].keys() == values.keys(), (step, set(mlflow[step]) ^ set(values))
        for k, v in values.items():
            assert wandb[step][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (step, k)
            assert mlflow[step][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (step, k)
    assert run.info.run_name == "calculator" and run.data.params["trainer.lr"] == "0.0003"
    assert run.info.status == "FINISHED"
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids["mlflow"] == run.info.run_id and ids["wandb"] in str(next((run_dir / "wandb").glob("offline-run-*")))
