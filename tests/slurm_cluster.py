"""A one-node Slurm cluster on this machine for the tests (Debian's slurm-wlm and munge: `.ci/run` installs them):
munged, slurmctld and slurmd on localhost with a configuration of their own (ports, state and logs in a temporary
folder), started and stopped by the fixture that uses this.  Where it cannot start (not root, the packages absent,
the daemons refusing), the caller falls back to submitit's local executor and says so."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "not root (slurmd runs jobs as their user; the test cluster runs as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    return None


def _munge_ok() -> bool:
    try:
        p = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=30)
        return p.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start(folder: Path, timeout: float = 120.0) -> dict | None:
    """Start the cluster; returns its environment ({"SLURM_CONF": ...}) or None when it does not come up."""
    if why_not() is not None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if not _munge_ok():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], capture_output=True, timeout=30)
        deadline = time.time() + 30
        while not _munge_ok() and time.time() < deadline:
            time.sleep(0.2)
        if not _munge_ok():
            return None
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 2
    conf = folder / "slurm.conf"
    for d in ("state", "spool"):
        (folder / d).mkdir(exist_ok=True)
    conf.write_text(f"""ClusterName=adapttest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
ReturnToService=2
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmdSpoolDir={folder}/spool
StateSaveLocation={folder}/state
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobRequeue=1
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {"SLURM_CONF": str(conf)}
    full = {**os.environ, **env}
    subprocess.run(["slurmctld", "-f", str(conf)], env=full, capture_output=True, timeout=60)
    subprocess.run(["slurmd", "-f", str(conf)], env=full, capture_output=True, timeout=60)
    deadline = time.time() + timeout
    while time.time() < deadline:  # until the node is idle: the cluster takes jobs
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], env=full, capture_output=True, text=True, timeout=30)
        if p.returncode == 0 and "idle" in p.stdout:
            return env
        time.sleep(0.5)
    stop(folder, env)
    return None


def stop(folder: Path, env: dict | None) -> None:
    full = {**os.environ, **(env or {})}
    if env:
        subprocess.run(["scancel", "-u", "root"], env=full, capture_output=True, timeout=60)
    for name in ("slurmd.pid", "slurmctld.pid"):
        pid = folder / name
        if pid.is_file():
            try:
                os.kill(int(pid.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
