"""A sweep on a Slurm cluster (a real one-node cluster on this machine, tests/slurm_cluster.py; where it cannot
start, the same code path through submitit's local executor, and the test says which it used): submitted as a job
array, one task cancelled midway, submitted again (only what is missing), merged: the same table as the sweep run
in one process.  Every wait is for a condition (a run's final.json, the queue empty), never a fixed time."""

import csv
import os
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapt import slurm as SL
from adapt import sweeps as S
from cli import app
from featstore.errors import UserError
from featstore.synthetic import make_pair
from tests import slurm_cluster

pytest.importorskip("submitit")

SET = {"steps": 40, "stage1_steps": 10, "eval_every": 20, "last_eval_every": 20, "last_evals": 1,
       "batch_source": 4, "batch_target": 4, "embed_dim": 16, "validators": False, "log": ["none"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    if os.environ.get("ADAPT_TEST_SLURM") == "local":  # the fallback path, on demand
        yield "local", {}, "ADAPT_TEST_SLURM=local"
        return
    env = slurm_cluster.start(folder)
    if env is None:
        yield "local", {}, slurm_cluster.why_not() or f"the daemons did not come up (logs in {folder})"
        return
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield "slurm", env, None
    finally:
        slurm_cluster.stop(folder, env)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for(cond, what, timeout=900):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def spec_file(tmp_path, root, out) -> Path:
    b = Path(root) / "i3d"
    sets = ", ".join(f"{k} = {v!r}".replace("'", '"').replace("False", "false") for k, v in SET.items())
    f = tmp_path / f"{Path(out).name}.toml"
    f.write_text(f'name = "slurm sweep"\nmethods = ["source_only", "dann"]\n'
                 f'pairs = [["{b}/S_train.zarr", "{b}/T_train.zarr", "{b}/T_test.zarr"]]\nseeds = [0, 1]\n'
                 f'out = "{out}"\nset = {{ {sets} }}\n[per_method.dann]\ngrid = {{ w_adv = [0.5, 1.0] }}\n')
    return f


def table(out: Path) -> dict:
    with open(out / "results.csv") as f:
        return {r["run"]: r["target_top1"] for r in csv.DictReader(f)}


def test_a_sweep_on_slurm_with_a_task_cancelled_midway_resumes_and_gives_the_same_table(cluster, tmp_path,
                                                                                         record_property):
    kind, env, why = cluster
    record_property("executor", kind if kind == "slurm" else f"local ({why})")
    print(f"executor: {kind}" + (f" ({why})" if why else ""))
    root = make_pair(tmp_path / "feat", "i3d", spatial=False, n=24, channels=8)
    reference = S.run_sweep(S.load_spec(spec_file(tmp_path, root, tmp_path / "inprocess")), None, progress=False,
                            max_stack=1)
    assert len(reference.trained) == 6
    spec = spec_file(tmp_path, root, tmp_path / "onslurm")
    opts = "partition=debug,time=30,cpus_per_task=1" if kind == "slurm" else "local"
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(spec), "--slurm", opts, "--max-stack", "1"])
    assert res.exit_code == 0 and "submitted 2 group(s) of 2 (6 runs)" in " ".join(res.output.split()), res.output
    record = SL._read(tmp_path / "onslurm")
    dann = record["groups"]["1"]
    first = [tmp_path / "onslurm" / r / "final.json" for r in dann["runs"]]
    # cancel the dann task once it has finished a run and before it finishes all four
    wait_for(lambda: any(f.is_file() for f in first), "the dann task's first complete run")
    if kind == "slurm":
        subprocess.run(["scancel", dann["job"]], check=True, timeout=60)
        wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(),
                 "an empty queue")
    else:
        import submitit
        job = submitit.local.local.LocalJob(tmp_path / "onslurm" / ".slurm", dann["job"])
        job.cancel()
        wait_for(lambda: SL._state(record, 1) == "finished" and SL._state(record, 0) == "finished",
                 "both local tasks ended")
    done_before = sum(f.is_file() for f in first)
    status = SL.status(S.load_spec(spec), str(spec), None, {})
    assert status["groups"][0] == "done"
    if done_before < 4:  # cancelled midway: the group is failed, the results not merged yet
        assert status["groups"][1] == "failed" and not status["files"]
    # submitted again: only the dann group, which goes on from its complete runs
    res = runner.invoke(app, ["sweep", str(spec), "--slurm", opts, "--max-stack", "1"])
    assert res.exit_code == 0, res.output
    if done_before < 4:
        assert "submitted 1 group(s) of 2 (4 runs)" in " ".join(res.output.split()), res.output
    record = SL._read(tmp_path / "onslurm")
    wait_for(lambda: all(f.is_file() for f in first) and SL._state(record, 1) == "finished", "the dann task's end")
    res = runner.invoke(app, ["sweep", str(spec), "--status"])
    assert res.exit_code == 0 and "every run is complete" in res.output, res.output
    assert table(tmp_path / "onslurm") == table(tmp_path / "inprocess")  # the in-process sweep's numbers


def test_slurm_options_are_checked(tmp_path):
    assert SL.parse("partition=gpu,time=240,gpus_per_node=1") == {"partition": "gpu", "time": 240,
                                                                    "gpus_per_node": 1}
    with pytest.raises(UserError, match="'nodes=2': expected key=value with a key among"):
        SL.parse("nodes=2")
    with pytest.raises(UserError, match="time='soon': expected a whole number"):
        SL.parse("time=soon")


def test_a_preempted_task_is_requeued_and_goes_on_from_its_complete_runs(cluster, tmp_path):
    kind, env, why = cluster
    if kind != "slurm":
        pytest.skip(f"needs the Slurm cluster: {why}")
    root = make_pair(tmp_path / "feat", "i3d", spatial=False, n=24, channels=8)
    spec = spec_file(tmp_path, root, tmp_path / "preempted")
    text = spec.read_text().replace('methods = ["source_only", "dann"]', 'methods = ["dann"]')
    spec.write_text(text)
    SL.submit(S.load_spec(spec), str(spec), None, {}, SL.parse("partition=debug,time=30,cpus_per_task=1"),
              max_stack=1)
    record = SL._read(tmp_path / "preempted")
    job = record["groups"]["0"]["job"]
    finals = [tmp_path / "preempted" / r / "final.json" for r in record["groups"]["0"]["runs"]]
    wait_for(lambda: any(f.is_file() for f in finals), "the task's first complete run")
    # what Slurm sends before preempting or at the time limit (submitit asks for USR2 90 s before)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)

    def requeued():  # back in the queue, held until a begin time Slurm sets (about two minutes): start it now
        line = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
        if "PENDING" in line and "BeginTime" in line:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=60)
        return all(f.is_file() for f in finals) and SL._state(record, 0) == "finished"
    wait_for(requeued, "the requeued task's end")
    logs = " ".join(p.read_text(errors="replace") for p in (tmp_path / "preempted" / ".slurm").glob("*_log.*"))
    assert "requeu" in logs.lower(), logs[-2000:]
    status = SL.status(S.load_spec(spec), str(spec), None, {})
    assert status["groups"] == {0: "done"} and status["files"]
