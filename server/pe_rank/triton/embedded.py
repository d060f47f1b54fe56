"""A real Triton Inference Server as a child process, on loopback, for development and CI.

Uses a ``tritonserver`` on PATH (the NGC containers) or else the binary shipped in the
nvidia-pytriton wheel, whose Python backend needs a little set-up:

* a backend folder holding the python backend plus the stub built for this Python;
* the wheel's bundled libraries on LD_LIBRARY_PATH, and this interpreter's own libpython
  first: otherwise the stub loads the system libpython, which may be an older patch
  release than the one our extension modules (e.g. ``_ssl``) were built against;
* this virtualenv's ``python3`` first on PATH, so models import our packages.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("pe_rank.triton")
_ERROR_LINE = re.compile(r"^E\d{4} |failed to load|UNAVAILABLE|error:", re.IGNORECASE)
_NOISE = ("CudaDriverHelper", "CUDA driver version is insufficient", "unable to create stream")


class TritonStartError(RuntimeError):
    """Triton did not become ready; the message carries Triton's own error lines."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wheel_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _backend_dir(wheel: Path) -> Path:
    """Python backend + the stub for this Python version, in a writable cache folder."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = Path(tempfile.gettempdir()) / f"pe-rank-triton-backends-{os.getuid()}" / version
    python = target / "python"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    if not (python / "triton_python_backend_stub").exists():
        tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        shutil.copytree(wheel / "backends" / "python", tmp / "python")
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        target.mkdir(parents=True, exist_ok=True)
        try:
            (tmp / "python").rename(python)
        except OSError:  # another process won the race; theirs is identical
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _command_and_env(repository: Path, grpc_port: int, http_port: int, metrics_port: int,
                     extra: list[str]) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    args = ["--model-repository", str(repository), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--http-address", "127.0.0.1", "--http-port", str(http_port), "--metrics-address", "127.0.0.1",
            "--metrics-port", str(metrics_port), "--exit-on-error=true", "--strict-readiness=true", *extra]
    on_path = shutil.which("tritonserver")
    if on_path:
        return [on_path, *args], env
    wheel = _wheel_root()
    if wheel is None:
        raise TritonStartError("no tritonserver found: install nvidia-pytriton or put tritonserver on PATH")
    libs = [str(wheel.parent.parent / "nvidia_pytriton.libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return [str(wheel / "bin" / "tritonserver"), *args, "--backend-directory", str(_backend_dir(wheel))], env


class TritonServer:
    """``with TritonServer(repo) as triton: use(triton.grpc_url)``; stopped on exit and at interpreter exit."""

    def __init__(self, repository: Path | str, grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None, extra_args: list[str] | None = None,
                 startup_timeout: float = 180.0, log_file: Path | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> "TritonServer":
        cmd, env = _command_and_env(self.repository, self.grpc_port, self.http_port, self.metrics_port, self.extra_args)
        log.info("starting Triton: %s", " ".join(cmd))
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", start_new_session=True)
        atexit.register(self.stop)
        self._reader = threading.Thread(target=self._forward_logs, daemon=True)
        self._reader.start()
        self._wait_ready()
        log.info("Triton ready: gRPC %s, HTTP %s", self.grpc_url, self.http_url)
        return self

    def _forward_logs(self) -> None:
        assert self.process and self.process.stdout
        sink = open(self.log_file, "a") if self.log_file else None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if sink:
                sink.write(line + "\n")
                sink.flush()
            if not any(n in line for n in _NOISE):
                log.debug("%s", line)
        if sink:
            sink.close()

    def error_lines(self) -> list[str]:
        return [line for line in list(self.lines) if _ERROR_LINE.search(line) and not any(n in line for n in _NOISE)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                self._fail(f"Triton exited with code {self.process.returncode}")
            if self._http_ready():
                return
            time.sleep(0.25)
        self._fail(f"Triton not ready after {self.startup_timeout:.0f} s")

    def _http_ready(self) -> bool:
        """Asked on our own fresh HTTP port: Triton binds gRPC first and exits if that fails, so
        a gRPC port someone else holds can never look ready here."""
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _fail(self, headline: str) -> None:
        """Kill the whole group (Python stubs outlive a Triton that failed after loading them)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        errors = self.error_lines() or list(self.lines)[-20:]
        raise TritonStartError(headline + ":\n" + "\n".join(errors))

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton finishes in-flight requests), SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Hard stop, for fault-injection tests."""
        if self.is_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cli_main(argv: list[str]) -> int:
    """``pe-rank triton --repository DIR``: run Triton in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="pe-rank triton", description=cli_main.__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--metrics-port", type=int)
    args = parser.parse_args(argv)
    logging.getLogger("pe_rank.triton").setLevel(logging.DEBUG)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with TritonServer(args.repository, args.grpc_port, args.http_port, args.metrics_port) as triton:
            print(f"Triton ready: gRPC {triton.grpc_url}, HTTP {triton.http_url} (Ctrl-C stops it)", flush=True)
            while not stop.is_set() and triton.is_alive():
                stop.wait(0.5)
    except TritonStartError as exc:
        from ..cli import UserError

        raise UserError(str(exc)) from None
    return 0
