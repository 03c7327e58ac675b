"""``logger=mlflow``: an MLflow run per kdrun run: the config as params, metrics per step and epoch, the
summary's results, and the run dir as artifacts when the run ends.

``logger.mlflow.tracking_uri``: a folder (default ``${paths.output_root}/mlruns``, a local file
store every run of that output root shares: ``mlflow ui --backend-store-uri outputs/mlruns``) or any
MLflow tracking URI (``http://host:5000``, ``sqlite:///mlflow.db``, ``databricks``). Metric keys:
``<stage>/step/loss``, ``<stage>/step/loss_<term>``, ``<stage>/step/lr`` (every ``trainer.log_every``
steps), ``<stage>/<column>`` per scored epoch (``student/test_top1``), all at the stage's step; the
summary's numbers under their own names. A resumed run continues its MLflow run (found by the
run dir's tag) and skips the steps and epochs that run already holds, so no value is logged twice.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdrun.loggers import Tracker, flat_params, row_scalars, summary_numbers

#: MLflow's limits: params and metrics per log_batch call, characters of a param value
BATCH_PARAMS, BATCH_METRICS, PARAM_CHARS = 100, 1000, 6000
RUN_DIR_TAG = "kdrun.run_dir"


class MlflowLogger(Tracker):
    requires = ("mlflow", "mlflow")

    def __init__(self, tracking_uri: str = "mlruns", experiment_name: str = "kdrun", artifacts: bool = True) -> None:
        self.tracking_uri, self.experiment_name, self.artifacts = str(tracking_uri), str(experiment_name), artifacts
        self.client = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.pending: list = []
        self.last_step: dict[str, int] = {}
        self.done: dict[str, tuple[int, int]] = {}  # stage -> (last step, last epoch) the MLflow run already holds
        self.resumed = False

    def uri(self) -> str:
        """The tracking URI: a plain folder becomes a local file store (``file://``)."""
        if "://" in self.tracking_uri or self.tracking_uri in ("databricks", "databricks-uc"):
            return self.tracking_uri
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks local folder stores to opt in
        return Path(self.tracking_uri).expanduser().resolve().as_uri()

    def open(self, run_dir: Path, config: dict, resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir).resolve()
        self.client = MlflowClient(tracking_uri=self.uri())
        experiment = self._experiment_id()
        found = self._earlier_run(experiment) if resume else None
        if found is not None:
            self.run_id, self.resumed = found, True
            self.client.update_run(found, status="RUNNING")
            return
        run = self.client.create_run(experiment, run_name=self.run_dir.name, tags={RUN_DIR_TAG: str(self.run_dir)})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in flat_params(config).items() if not k.startswith("hydra")]
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH_PARAMS])

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except Exception:  # noqa: BLE001 - another job of the sweep created it first
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def _earlier_run(self, experiment: str) -> str | None:
        runs = self.client.search_runs([experiment], filter_string=f"tags.`{RUN_DIR_TAG}` = '{self.run_dir}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def truncate(self, stage: str, after_epoch: int) -> None:
        """What the MLflow run holds of ``stage`` already (a resumed run): those steps are not logged again."""
        self.last_step.pop(stage, None)
        if not self.resumed:
            return
        steps = self.client.get_metric_history(self.run_id, f"{stage}/step/loss")
        epochs = self.client.get_metric_history(self.run_id, f"{stage}/epoch")
        self.done[stage] = (max((m.step for m in steps), default=0), int(max((m.value for m in epochs), default=0)))

    def log_step(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        self.last_step[stage] = step
        if step <= self.done.get(stage, (0, 0))[0]:
            return
        self._add({f"{stage}/step/{k}": v for k, v in scalars.items()}, step)

    def append(self, row: dict) -> None:
        stage, epoch = str(row["stage"]), int(row["epoch"])
        if epoch > self.done.get(stage, (0, 0))[1]:
            suffix = f"/{row['model']}" if row.get("model") else ""
            values = {f"{stage}/{k}{suffix}": v for k, v in row_scalars(row).items()}
            values[f"{stage}/epoch"] = float(epoch)
            self._add(values, self.last_step.get(stage, epoch))
        self._flush()

    def _add(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, int(step)) for k, v in values.items()]

    def _flush(self) -> None:
        for i in range(0, len(self.pending), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + BATCH_METRICS])
        self.pending = []

    def close(self, summary: dict) -> None:
        results = summary_numbers(summary)
        self._add(results, 0)
        self._flush()
        self.client.set_tag(self.run_id, "kdrun.status", str(summary.get("status")))
        if self.artifacts:
            self.client.log_artifacts(self.run_id, str(self.run_dir))
        status = {"ok": "FINISHED", "interrupted": "KILLED"}.get(str(summary.get("status")), "FAILED")
        self.client.set_terminated(self.run_id, status=status)
