"""Experiment trackers behind the run logger's interface: wandb and mlflow (trainer.loggers; docs/trackers.md).

Both are optional (`pip install 'tracerl[tracking]'`) and record the same scalars as TensorBoard:
`train/<key>` at each step and `eval/<split>/<key>` at each evaluation, the finite numbers of the rows of
metrics.jsonl and eval.jsonl (`tracerl.runlog.scalars`), with the run's config.

* wandb: a run in project trainer.project named run.name, its files under RUN_DIR/wandb; the usual
  variables apply (WANDB_MODE=offline needs no account or network, WANDB_API_KEY, WANDB_ENTITY ...).
* mlflow: a run in experiment trainer.project named run.name, through the tracking client (no global
  active run), at MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns (mlflow >= 3 needs
  MLFLOW_ALLOW_FILE_STORE=true for file stores; tracerl sets it for its own default only). The config
  goes in as parameters.

A resume continues the same tracker runs (their ids are kept in RUN_DIR/trackers.json). Rows a crashed
run logged after its last checkpoint stay in the trackers (metrics.jsonl drops them; wandb ignores the
repeated steps with a warning, mlflow keeps both values of a step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from tracerl.errors import TracerlError
from tracerl.runlog import LOGGERS, LoggerContext, scalars

TRACKERS_FILE = "trackers.json"  # {"wandb": run id, "mlflow": run id} of this run directory


def check_available(names: list[str]) -> None:
    """One-line TracerlError naming a logger of trainer.loggers whose package (its `package` trait) is not installed."""
    for name in names:
        module = LOGGERS.trait(name, "package")
        if module is not None and importlib.util.find_spec(module) is None:
            raise TracerlError(f"config key 'trainer.loggers': {name} is not installed; pip install 'tracerl[tracking]' "
                               f"(or {module}) or drop {name}")


def _saved_ids(ctx: LoggerContext) -> dict[str, str]:
    path = ctx.run_dir / TRACKERS_FILE
    if ctx.resume_step is None or not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _save_id(ctx: LoggerContext, name: str, run_id: str) -> None:
    from tracerl.rundir import atomic_write_text

    path = ctx.run_dir / TRACKERS_FILE
    ids = {}
    if path.is_file():
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            ids = {}
    atomic_write_text(path, json.dumps({**ids, name: run_id}, indent=1))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _failed(name: str, e: BaseException) -> TracerlError:
    first = " ".join(str(e).split())[:200] or type(e).__name__
    return TracerlError(f"trainer.loggers: {name} could not start a run: {first}")


@LOGGERS.register("wandb", package="wandb")
class WandbLogger:
    """A wandb run (online, or offline with WANDB_MODE=offline) fed the rows' scalars."""

    def __init__(self, ctx: LoggerContext):
        import wandb

        saved = _saved_ids(ctx).get("wandb")
        try:
            self.run = wandb.init(project=ctx.project, name=ctx.run_name, dir=str(ctx.run_dir), config=dict(ctx.config),
                                  id=saved, resume="allow" if saved else None, reinit="create_new")
        except Exception as e:
            raise _failed("wandb", e) from None
        _save_id(ctx, "wandb", self.run.id)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(scalars("train", metrics), step=int(step))

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        self.run.log(scalars(f"eval/{split}", metrics), step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


@LOGGERS.register("mlflow", package="mlflow")
class MlflowLogger:
    """An mlflow run (the tracking client's API, no global active run) fed the rows' scalars."""

    def __init__(self, ctx: LoggerContext):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the default: a file store inside the run directory
            uri = (ctx.run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        try:
            self.client = MlflowClient(uri)
            saved = _saved_ids(ctx).get("mlflow")
            if saved:
                self.run_id = saved
            else:
                exp = self.client.get_experiment_by_name(ctx.project)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(ctx.project)
                self.run_id = self.client.create_run(exp_id, run_name=ctx.run_name).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in _flat(ctx.config).items()]
                for i in range(0, len(params), 100):  # mlflow takes at most 100 parameters a batch
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
        except Exception as e:
            raise _failed("mlflow", e) from None
        _save_id(ctx, "mlflow", self.run_id)

    def _log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # mlflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log(step, scalars("train", metrics))

    def log_eval(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        self._log(step, scalars(f"eval/{split}", metrics))

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None
