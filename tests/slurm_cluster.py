"""A one-node SLURM cluster on localhost for tests: munged + slurmctld + slurmd, started and stopped
by the test (as root, no systemd). `LocalSlurm.available()` says why it cannot run, if it cannot."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 20000):
        self.root, self.cpus, self.memory_mb = root, cpus, memory_mb
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def available() -> str | None:
        for tool in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol"):
            if shutil.which(tool) is None:
                return f"{tool} not installed (apt-get install slurm-wlm munge)"
        if os.geteuid() != 0:
            return "the local SLURM cluster must be started as root"
        return None

    def start(self) -> LocalSlurm:
        r = self.root
        for d in ("state", "spool", "log", "munge", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)
        key, self.socket = r / "munge" / "munge.key", r / "munge" / "munge.socket"
        subprocess.run(
            ["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True
        )
        os.chmod(key, 0o600)
        ctl_port, d_port = _free_port(), _free_port()
        self.conf = r / "slurm.conf"
        self.conf.write_text(f"""ClusterName=simvlgtest
SlurmctldHost=localhost
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={self.memory_mb // self.cpus}
MailProg=/bin/true
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
JobRequeue=1
KillWait=30
MinJobAge=300
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._spawn(
            [
                "munged",
                "--foreground",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={r}/run/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munge/seed",
                "--force",
            ]
        )
        time.sleep(0.5)
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"])
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed"):
                return self
            time.sleep(0.5)
        raise RuntimeError(
            f"SLURM did not come up: {out.stdout} {out.stderr}\n"
            + (r / "log" / "slurmctld.log").read_text()[-2000:]
        )

    def _spawn(self, cmd):
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")},
            )
        )

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=check)

    def sbatch(self, *args, env=None, cwd=None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            check=True,
            cwd=cwd,
        )
        return out.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_state(self, job: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        state = self.job_state(job)
        while time.time() < deadline and state not in states:
            time.sleep(1)
            state = self.job_state(job)
        return state

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
