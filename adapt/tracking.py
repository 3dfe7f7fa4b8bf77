"""Live curves in the trackers labs already use: TensorBoard, MLflow and Weights & Biases, through their own
libraries (optional extras: ``pip install 'adapt-epic[trackers]'``).

Every run (each of K stacked runs its own) logs its settings, each evaluation's metrics (target top-1, each
stream's, verb / noun / action on EPIC-100, the validators' scores, the loss terms' means since the last
evaluation), its invalid marks, and at its end its final numbers and files:

* ``tensorboard`` (the default when the package is installed): event files in the run's folder (``<run>/tb``),
  written with torch's ``SummaryWriter``; settings as text and as hyper-parameters;
* ``mlflow``: one MLflow run per run, in an experiment named after the sweep (or "adapt"), the grid point and seed
  as tags; the tracking URI from ``mlflow_uri`` (default a local store, ``<out>/mlruns``);
* ``wandb``: one W&B run per run, offline unless ``wandb_mode=online`` (files under ``<run>/wandb``), grouped by
  the sweep, the grid point and seed as tags and config.

``log`` (``--log tensorboard,mlflow``, a sweep spec's ``log``) names them; ``auto`` is TensorBoard when it is
installed.  A tracker whose package is missing is said in one line (what it would log, how to install it) and the
run goes on with the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from featstore.errors import UserError

KNOWN = ("tensorboard", "mlflow", "wandb")
INSTALL = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def installed(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def chosen(log: list) -> list[str]:
    """The trackers a run logs to: ``log`` as given (``auto``: TensorBoard when installed); unknown names refused."""
    names = [n.strip() for n in (log or ["auto"]) if str(n).strip()]
    out = []
    for n in names:
        if n in ("auto", "none", "off"):
            continue
        if n not in KNOWN:
            raise UserError(f"log={','.join(names)}: {n!r} is not a tracker (one of {', '.join(KNOWN)}, auto, none)")
        out.append(n)
    if "auto" in names and "tensorboard" not in out and installed("tensorboard"):
        out.insert(0, "tensorboard")
    return out


def missing_line(names: list) -> str | None:
    """One line for the trackers asked for whose package is not installed."""
    lacking = [n for n in names if not installed(INSTALL[n])]
    if not lacking:
        return None
    return (f"{', '.join(lacking)} not installed: this run's settings and curves go to metrics.jsonl only, not to "
            f"{' or '.join(lacking)} (pip install {' '.join(INSTALL[n] for n in lacking)}, or "
            f"'adapt-epic[trackers]')")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"validators": {"im": 0.3}} -> {"validators/im": 0.3}; numbers only."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = float(v)
    return out


def eval_metrics(row: dict) -> dict:
    """What a metrics.jsonl row logs: its numbers, flattened (``per_modality/rgb``, ``validators/im``,
    ``loss/adv``)."""
    return flatten({k: v for k, v in row.items() if k not in ("step", "collapsed")})


class Run:
    """One run's trackers: :meth:`evaluation` at each evaluation, :meth:`finish` at the end."""

    def __init__(self, names: list, run_name: str, run_dir: Path, out: Path, settings: dict, group: str | None,
                 tags: dict):
        self.writers = []
        for n in names:
            if not installed(INSTALL[n]):
                continue
            self.writers.append({"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}[n](
                run_name, Path(run_dir), Path(out), settings, group, tags))

    def evaluation(self, step: int, row: dict) -> None:
        metrics = eval_metrics(row)
        for w in self.writers:
            w.log(step, metrics)

    def finish(self, final: dict, files: list) -> None:
        for w in self.writers:
            w.finish(final, [Path(f) for f in files if Path(f).is_file()])

    def close(self) -> None:
        for w in self.writers:
            w.close()


def _params(settings: dict) -> dict:
    """Settings as flat strings (trackers keep parameters as text)."""
    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in settings.items()
            if k not in ("provenance",)}


class _TensorBoard:
    def __init__(self, run_name, run_dir, out, settings, group, tags):
        from torch.utils.tensorboard import SummaryWriter
        self.dir = run_dir / "tb"
        self.w = SummaryWriter(log_dir=str(self.dir))
        self.w.add_text("settings", "\n".join(f"    {k} = {v}" for k, v in _params(settings).items()), 0)
        self.w.add_text("run", f"{run_name}; " + ", ".join(f"{k}={v}" for k, v in tags.items()), 0)
        self.settings = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}
        self.last: dict = {}

    def log(self, step, metrics):
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.last = metrics
        self.w.flush()

    def finish(self, final, files):
        marks = ",".join(final.get("invalid") or []) or "none"
        self.w.add_text("invalid", marks, int(final.get("steps", 0)))
        self.w.add_hparams({**self.settings, "invalid": marks},
                           {f"final/{k}": v for k, v in flatten({k: final[k] for k in (
                               "target_top1", "verb_top1", "noun_top1", "action_top1") if k in final}).items()},
                           run_name=".")
        self.w.flush()

    def close(self):
        self.w.close()


class _MLflow:
    def __init__(self, run_name, run_dir, out, settings, group, tags):
        import mlflow
        self.mlflow = mlflow
        uri = settings.get("mlflow_uri") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store but asks to be told that it is wanted
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = group or "adapt"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run = self.client.create_run(exp_id, run_name=run_name,
                                          tags={**{k: str(v) for k, v in tags.items()}, "run_dir": str(run_dir)})
        rid = self.run.info.run_id
        params = _params(settings)
        from mlflow.entities import Param
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(rid, params=items[i:i + 100])

    def log(self, step, metrics):
        from mlflow.entities import Metric
        import time
        now = int(time.time() * 1000)
        self.client.log_batch(self.run.info.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, final, files):
        rid = self.run.info.run_id
        self.client.set_tag(rid, "invalid", ",".join(final.get("invalid") or []) or "none")
        for k, v in flatten({k: final[k] for k in ("target_top1", "verb_top1", "noun_top1", "action_top1")
                             if k in final}).items():
            self.client.log_metric(rid, f"final/{k}", v)
        for f in files:
            self.client.log_artifact(rid, str(f))
        self.client.set_terminated(rid, "FINISHED")

    def close(self):
        pass


class _Wandb:
    def __init__(self, run_name, run_dir, out, settings, group, tags):
        import wandb
        self.wandb = wandb
        mode = settings.get("wandb_mode") or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=group or "adapt", group=group, name=run_name, dir=str(run_dir),
                              config=_params(settings), tags=[f"{k}={v}" for k, v in tags.items()], mode=mode,
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def finish(self, final, files):
        self.run.summary["invalid"] = ",".join(final.get("invalid") or []) or "none"
        for k in ("target_top1", "verb_top1", "noun_top1", "action_top1"):
            if k in final:
                self.run.summary[f"final/{k}"] = final[k]
        if files:
            art = self.wandb.Artifact(f"{self.run.name}-files".replace("+", "-"), type="run-files")
            for f in files:
                art.add_file(str(f))
            self.run.log_artifact(art)
        self.run.finish()

    def close(self):
        pass
