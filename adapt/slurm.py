"""A sweep on a Slurm cluster: ``adapt sweep SPEC --slurm partition=gpu,gpus_per_node=1,time=240`` submits the
sweep's stacked groups that still have runs to train as one job array (through submitit), a task per group; every
task is an ordinary sweep of its own group (stacked as on one machine, each run written whole, resumable), so:

* running the same command again submits only the groups whose runs are not all complete (a task killed by the
  scheduler, cancelled, or out of time resumes from the runs it finished);
* a task that is preempted or reaches its time limit is requeued by submitit (Slurm's signal ``USR2`` 90 s before,
  then :meth:`GroupTask.checkpoint`) and goes on from its complete runs;
* ``adapt sweep SPEC --status`` says, per group, what is queued, running, done and failed (``squeue`` and the runs'
  folders: no accounting database needed) and, once every run is complete, merges the results files
  (``results.jsonl``, ``results.csv``) as the one-machine and torchrun paths write them.

The submission's record is ``<out>/.slurm/jobs.json``; submitit's scripts and logs are under ``<out>/.slurm/``.
``--slurm local`` runs the same tasks as local processes (submitit's local executor), for a machine without Slurm.
Options: ``partition``, ``time`` (minutes), ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``array_parallelism``,
``account``, ``qos``, ``constraint``, ``exclude``, and ``local``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from featstore.errors import UserError

OPTIONS = {"partition": "slurm_partition", "time": "timeout_min", "gpus_per_node": "gpus_per_node",
           "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "array_parallelism": "slurm_array_parallelism",
           "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
           "exclude": "slurm_exclude"}
NUMBERS = {"time", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism"}


def parse(text: str) -> dict:
    """``partition=gpu,time=240,gpus_per_node=1`` (or ``local``) -> {option: value}; an unknown option is one line."""
    out: dict = {}
    for item in [i.strip() for i in str(text or "").split(",") if i.strip()]:
        if item == "local":
            out["local"] = True
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise UserError(f"--slurm {text}: {item!r}: expected key=value with a key among {', '.join(OPTIONS)} "
                            f"(or local)")
        if key in NUMBERS:
            try:
                value = int(value)
            except ValueError:
                raise UserError(f"--slurm {text}: {key}={value!r}: expected a whole number") from None
        out[key] = value
    return out


class GroupTask:
    """One array task: the sweep's groups ``groups`` trained as a sweep of their own (picklable for submitit)."""

    def __init__(self, spec: dict, where: str, out: str | None, extra_set: dict, max_stack: int | None = None):
        self.spec, self.where, self.out, self.extra_set, self.max_stack = spec, where, out, extra_set, max_stack

    def __call__(self, group: int) -> list:
        from adapt.sweeps import run_sweep
        res = run_sweep(self.spec, None, progress=False, out=self.out, extra_set=self.extra_set, where=self.where,
                        only_groups=[group], rank=0, world=1, max_stack=self.max_stack)
        return res.trained

    def checkpoint(self, group: int):
        """Preempted or out of time: requeued as it is; it resumes from its complete runs."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, group)


def _folder(out: Path) -> Path:
    return Path(out) / ".slurm"


def _executor(folder: Path, opts: dict):
    import submitit
    local = opts.get("local") or shutil.which("sbatch") is None
    ex = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else "slurm")
    params = {OPTIONS[k]: v for k, v in opts.items() if k in OPTIONS}
    if local:
        params = {k: v for k, v in params.items() if k in ("timeout_min", "gpus_per_node", "cpus_per_task")}
    ex.update_parameters(name="adapt-sweep", **params)
    return ex, ("local" if local else "slurm")


def _plan(spec: dict, where: str, out: str | None, extra_set: dict):
    from adapt.sweeps import expand, group_runs, is_complete, missing_stores
    runs = expand(spec, where, out=out, extra_set=extra_set)
    groups = group_runs(runs)
    todo = [gi for gi, g in enumerate(groups) if any(not is_complete(r)[0] for r in g.runs)]
    return runs, groups, todo, missing_stores([r for gi in todo for r in groups[gi].runs])


def submit(spec: dict, where: str, out: str | None, extra_set: dict, opts: dict, console=None,
           max_stack: int | None = None) -> dict:
    """Submit the groups with runs to train as one job array; returns and writes the submission's record."""
    runs, groups, todo, missing = _plan(spec, where, out, extra_set)
    out_dir = Path(runs[0].cfg.out) if runs else Path(out or "runs/sweep")
    if missing:
        raise UserError(f"{len(missing)} feature store(s) of the sweep are missing: {', '.join(missing)}")
    record = _read(out_dir)
    if not todo:
        if console is not None:
            console.print(f"sweep {spec.get('name') or where}: every run is complete; nothing to submit "
                          f"(`--status` merges the results)", highlight=False)
        return record
    busy = [gi for gi in todo if _state(record, gi) in ("queued", "running")]
    if busy:
        raise UserError(f"groups {busy} of this sweep are queued or running now (jobs "
                        f"{', '.join(str(record['groups'][str(g)]['job']) for g in busy)}); wait for them or "
                        f"scancel them before submitting again (`adapt sweep {where} --status`)")
    folder = _folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ex, kind = _executor(folder, opts)
    task = GroupTask(spec, where, out, extra_set, max_stack)
    jobs = ex.map_array(task, todo)
    now = time.time()
    for gi, job in zip(todo, jobs):
        record.setdefault("groups", {})[str(gi)] = {
            "job": str(job.job_id), "submitted": now, "executor": kind,
            "runs": [r.name for r in groups[gi].runs], "method": groups[gi].runs[0].cfg.method,
            "pair": groups[gi].runs[0].pair}
    record.update(spec=where, out=str(out_dir), executor=kind)
    _write(out_dir, record)
    if console is not None:
        console.print(f"submitted {len(todo)} group(s) of {len(groups)} ({sum(len(groups[g].runs) for g in todo)} "
                      f"runs) to {kind} as job {str(jobs[0].job_id).split('_')[0]}; `adapt sweep {where} --status` "
                      f"follows them", highlight=False, soft_wrap=True)
    return record


def status(spec: dict, where: str, out: str | None, extra_set: dict, console=None) -> dict:
    """{group: state} (queued, running, done, failed, not submitted) and, when every run is complete, the results
    files merged."""
    from adapt.sweeps import collect_rows, is_complete, write_results
    runs, groups, _, _ = _plan(spec, where, out, extra_set)
    out_dir = Path(runs[0].cfg.out) if runs else Path(out or "runs/sweep")
    record = _read(out_dir)
    states = {}
    for gi, g in enumerate(groups):
        complete = sum(is_complete(r)[0] for r in g.runs)
        if complete == len(g.runs):
            states[gi] = "done"
        else:
            states[gi] = _state(record, gi) or "not submitted"
            if states[gi] == "finished":  # the job ended, its runs are not all there
                states[gi] = "failed"
        states[gi] = (states[gi], complete, len(g.runs))
    files = []
    if all(s[0] == "done" for s in states.values()):
        files = write_results(collect_rows(runs), out_dir)
    if console is not None:
        from rich.table import Table
        t = Table(title=f"sweep {spec.get('name') or where}: {sum(s[0] == 'done' for s in states.values())} of "
                        f"{len(groups)} groups done")
        for c in ("group", "method", "pair", "runs complete", "state", "job"):
            t.add_column(c)
        for gi, (state, complete, n) in states.items():
            g = groups[gi]
            job = record.get("groups", {}).get(str(gi), {}).get("job", "-")
            t.add_row(str(gi), g.runs[0].cfg.method, g.runs[0].pair, f"{complete}/{n}", state, job)
        console.print(t)
        if files:
            console.print("every run is complete: " + ", ".join(str(f) for f in files), highlight=False)
        elif any(s[0] == "failed" for s in states.values()):
            console.print(f"failed groups stopped before their runs were complete (logs in {_folder(out_dir)}); "
                          f"submitting again trains what is missing", highlight=False)
    return {"groups": {gi: s[0] for gi, s in states.items()}, "files": files}


def _state(record: dict, gi: int) -> str | None:
    """queued / running (squeue, or the local process), finished (it ended), or None (never submitted)."""
    entry = record.get("groups", {}).get(str(gi))
    if not entry:
        return None
    job = entry["job"]
    if entry.get("executor") == "local":
        import submitit
        st = submitit.local.local.LocalJob(Path(record["out"]) / ".slurm", job).state
        return {"RUNNING": "running", "PENDING": "queued"}.get(st, "finished")
    try:
        line = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "finished"
    if not line:
        return "finished"
    return {"PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "RUNNING": "running",
            "COMPLETING": "running"}.get(line.split()[0], "finished")


def _read(out_dir: Path) -> dict:
    f = _folder(out_dir) / "jobs.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write(out_dir: Path, record: dict) -> None:
    from adapt.metrics import write_atomic
    write_atomic(_folder(out_dir) / "jobs.json", json.dumps(record, indent=1))
