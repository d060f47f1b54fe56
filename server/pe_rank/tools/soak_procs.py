"""The soak's view of the server as the kernel sees it: the ``pe-rank serve`` child, every process
below it, its Tritons' shared-memory regions, its RSS, and the machine. Linux /proc only (no psutil)."""
from __future__ import annotations

import collections
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .soak_mix import SoakError

SHM_DIR = Path("/dev/shm")


# ---- the server and everything below it, as the kernel sees them

def _stat(pid: int) -> tuple[str, str, int, int, int] | None:
    """(comm, state, ppid, pgid, starttime) from /proc/PID/stat, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    f = raw[raw.rindex(")") + 2:].split()
    return comm, f[0], int(f[1]), int(f[2]), int(f[19])


def _all_stats() -> dict[int, tuple[str, str, int, int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def alive(pid: int, starttime: int) -> bool:
    """Still the same process (not a reused pid) and not a zombie."""
    st = _stat(pid)
    return st is not None and st[4] == starttime and st[1] != "Z"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except FileNotFoundError:
        return None
    return None


class Watcher(threading.Thread):
    """Scans /proc and /dev/shm every ``period`` s: every descendant of the server (and every member of
    a tritonserver's process group: the Python stubs stay there when Triton dies) and every shm region
    under the server's prefix (``pe_rank_triton_<server pid>_``) ever seen."""

    def __init__(self, server_pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True, name="soak-watcher")
        self.server_pid, self.period = server_pid, period
        self.seen: dict[int, tuple[str, int]] = {}      # pid -> (comm, starttime)
        self.tritons: dict[int, int] = {}               # tritonserver pid -> starttime
        self.shm_prefix = f"pe_rank_triton_{server_pid}_"
        self.shm_seen: set[str] = set()
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def scan(self) -> None:
        stats = _all_stats()
        children = collections.defaultdict(list)
        for pid, st in stats.items():
            children[st[2]].append(pid)
        found, todo = set(), [self.server_pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        with self.lock:
            groups = set(self.tritons)
            found |= {pid for pid, st in stats.items() if st[3] in groups}
            for pid in found:
                comm, _, ppid, _, start = stats[pid]
                self.seen.setdefault(pid, (comm, start))
                if comm == "tritonserver" and ppid == self.server_pid:
                    self.tritons.setdefault(pid, start)
        try:
            names = {p.name for p in SHM_DIR.iterdir() if p.name.startswith(self.shm_prefix)}
        except OSError:
            names = set()
        with self.lock:
            self.shm_seen |= names

    def run(self) -> None:
        while not self.halt.wait(self.period):
            self.scan()

    def current_triton(self) -> int | None:
        """The running tritonserver child of the server (fresh scan)."""
        self.scan()
        with self.lock:
            running = [pid for pid, start in self.tritons.items() if alive(pid, start)]
        return max(running) if running else None

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(processes still alive, shm regions still there): call after the server exited."""
        with self.lock:
            procs = [f"{pid} {comm}" for pid, (comm, start) in sorted(self.seen.items()) if alive(pid, start)]
        try:
            shm = sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(self.shm_prefix))
        except OSError:
            shm = []
        return procs, shm


# ---- the server process

class ServerProcess:
    """``pe-rank serve --port 0`` as a child; its output goes to a log file, read for the ready line."""

    READY = re.compile(r"pe-rank ready on (\S+):(\d+)\.")

    def __init__(self, repository: Path, serve_args: list[str], log_path: Path) -> None:
        self.cmd = [sys.executable, "-m", "pe_rank", "serve", "--repository", str(repository), "--port", "0",
                    *serve_args]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w", encoding="utf-8")
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.ready = threading.Event()
        self.target = ""
        self.process = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True, name="soak-server-log")
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)
            self.log.flush()
            self.tail.append(line.rstrip())
            if not self.ready.is_set() and (m := self.READY.search(line)):
                host = m.group(1)
                self.target = f"[{host}]:{m.group(2)}" if ":" in host else f"{host}:{m.group(2)}"
                self.ready.set()

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.5):
            if self.process.poll() is not None:
                raise SoakError(f"pe-rank serve exited with code {self.process.returncode} before it was ready:\n"
                                + "\n".join(self.tail))
            if time.monotonic() > deadline:
                raise SoakError(f"pe-rank serve not ready within {timeout:.0f} s:\n" + "\n".join(self.tail))
        return self.target

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait; the exit code, or None when it had to be SIGKILLed."""
        code: int | None = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(10)
        self.log.close()
        return code


def machine() -> dict:
    """What the figures were measured on (a soak's timings mean little without it)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])  # MemTotal: N kB
        mem_gib = round(kib / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "mem_total_gib": mem_gib, "kernel": platform.release(),
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}
