"""A throwaway single-node Slurm cluster on localhost: munged + slurmctld + slurmd in one temp dir.

Why: the `hydra/launcher=slurm` preset is only known to work once jobs really go through
sbatch/srun. This starts the smallest real cluster that runs them, on a machine without
systemd or cgroups (settings from shared/notes/slurm-single-node.md), with its own munge
key and socket, free ports and every state/log/pid file under the temp dir, so it touches
nothing system-wide. Daemons run in the foreground as our children and are stopped by pid.

    with SlurmCluster(tmp_dir) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)   # SLURM_CONF points at this cluster
        cluster.submitted_job_ids()                         # ids slurmctld accepted

As a script, `python tests/slurm_cluster.py [DIR]` starts one and keeps it up until Ctrl-C / SIGTERM.
Needs root and the Debian packages slurm-wlm + munge (`make setup-slurm`).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scancel")
PARTITION = "debug"


def missing_binaries() -> list[str]:
    """Slurm/munge programs not on PATH (empty when a cluster can be started)."""
    return [b for b in BINARIES if shutil.which(b) is None]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line(name: str) -> str:
    """This machine's NodeName line, from `slurmd -C`, with ~80% of its memory offered to jobs."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(kv.split("=", 1) for kv in out.split())
    fields["NodeName"] = name
    fields["RealMemory"] = str(int(int(fields.get("RealMemory", "2048")) * 0.8))
    return " ".join(f"{k}={v}" for k, v in fields.items())


class SlurmCluster:
    """One slurmctld + one slurmd (this host, all its CPUs, partition `debug`) and a private munged."""

    def __init__(self, root: str | Path, start_timeout_s: float = 60.0):
        self.root = Path(root).resolve()
        self.start_timeout_s = start_timeout_s
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, squeue, submitit) that talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- start
    def start(self) -> "SlurmCluster":
        """Write key + slurm.conf, start the three daemons and wait until the node is idle."""
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm binaries not found: {missing} (apt-get install -y slurm-wlm munge)")
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        out.close()

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                               f"--seed-file={d / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged socket")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=mtlsparse-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'log' / 'jobcomp.txt'}",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=5",
            "SlurmdTimeout=60",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            _node_line(self.host),
            f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; logs:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {self.start_timeout_s}s waiting for {what}; logs:\n{self.logs()}")

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            return out.returncode == 0 and out.stdout.strip() == "idle"
        self._wait(idle, f"node {self.host} idle in sinfo")

    # ---------------------------------------------------------------- inspect
    def submitted_job_ids(self) -> list[str]:
        """Job ids slurmctld accepted from sbatch, in order (array jobs as `<id>_<task>` once split)."""
        log = self.root / "log" / "slurmctld.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\S+)", text)

    def completed_jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the jobcomp file: one dict per job (JobId, JobState, ArrayJobId, ...)."""
        path = self.root / "log" / "jobcomp.txt"
        if not path.exists():
            return []
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                for line in path.read_text(errors="replace").splitlines() if line.strip()]

    def logs(self, tail: int = 40) -> str:
        """Last lines of every daemon log, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_queue_empty(self, timeout_s: float = 60.0) -> bool:
        """Wait until squeue lists no job (jobs still exiting after their result was written); True if empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            q = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=self.env)
            if q.returncode != 0 or not q.stdout.strip():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    # ---------------------------------------------------------------- stop
    def stop(self) -> None:
        """Let running jobs end (up to 30 s), cancel what is left, stop slurmd, slurmctld, munged by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            if not self.wait_queue_empty(30):
                subprocess.run(["scancel", "--full", f"--partition={PARTITION}"], env=self.env, capture_output=True)
                self.wait_queue_empty(20)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """Start a cluster in DIR (default: a new temp dir), print how to use it, stop it on Ctrl-C or SIGTERM."""
    root = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="slurm-"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` also stops the daemons
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even when started in the background
    with SlurmCluster(root) as cluster:
        print(f"Slurm is up: export SLURM_CONF={cluster.conf}   (logs in {root / 'log'}); "
              f"Ctrl-C or `kill {os.getpid()}` stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
