"""A real one-node Slurm cluster on this machine, for the launch/slurm tests.

Debian's `slurm-wlm` and `munge`, installed with apt when missing (needs root, as on CI; elsewhere the
tests skip with the reason), configured in a temporary directory: munged, slurmctld and slurmd, one
node with this machine's CPUs, one partition. Stopped by the pids in their pid files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")


def why_not() -> str | None:
    """Why a Slurm cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "a one-node Slurm cluster needs root (munge and slurmd run as root); CI runs as root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


def install() -> None:
    if all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = subprocess.run(
        ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env, capture_output=True, text=True
    )
    if run.returncode != 0:  # an old package index: refresh it once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env, capture_output=True, check=True
        )


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> Cluster:
        install()
        self._munge()
        for sub in ("spool/ctld", "spool/d", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        ports = _free_ports(2)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=longboi-test",
                    f"SlurmctldHost={self.host}",
                    f"SlurmctldPort={ports[0]}",
                    f"SlurmdPort={ports[1]}",
                    "AuthType=auth/munge",
                    # a requeued job waits out its old credential's lifetime (120 s by default) before it may
                    # start again; starting it sooner makes slurmd refuse it ("credential revoked")
                    "AuthInfo=cred_expire=5",
                    "SchedulerParameters=sched_interval=1",  # look for startable jobs every second, not 60
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "ReturnToService=2",
                    "MinJobAge=600",
                    "KillWait=5",
                    f"StateSaveLocation={self.root}/spool/ctld",
                    f"SlurmdSpoolDir={self.root}/spool/d",
                    f"SlurmctldPidFile={self.root}/run/slurmctld.pid",
                    f"SlurmdPidFile={self.root}/run/slurmd.pid",
                    f"SlurmctldLogFile={self.root}/log/slurmctld.log",
                    f"SlurmdLogFile={self.root}/log/slurmd.log",
                    f"NodeName={self.host} CPUs={os.cpu_count()} RealMemory={memory_mb // 2} State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not come up: {state!r}; see {self.root}/log")

    def _munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        for d in ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            subprocess.run(["chown", "-R", "munge:munge", d], check=True)
        self.started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
        if self.started_munge:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check)

    def state(self, job: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...) from scontrol (no accounting here)."""
        out = self.run("scontrol", "show", "job", job).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "GONE")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for daemon in DAEMONS:
            pid_file = self.root / "run" / f"{daemon}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        if getattr(self, "started_munge", False):
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
