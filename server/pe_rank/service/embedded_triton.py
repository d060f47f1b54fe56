"""A real Triton Inference Server as a child process, on loopback, for development and CI.

Uses a ``tritonserver`` on PATH (the NGC containers) or else the binary shipped in the
nvidia-pytriton wheel, whose Python backend needs a little set-up:

* a backend folder holding the python backend plus the stub built for this Python;
* the wheel's bundled libraries on LD_LIBRARY_PATH, and this interpreter's own libpython
  first: otherwise the stub loads the system libpython, which may be an older patch
  release than the one our extension modules (e.g. ``_ssl``) were built against;
* this virtualenv's ``python3`` first on PATH, so models import our packages.

Triton and its Python backend stubs never outlive us: Triton runs in its own session (one
process group, which also holds the stubs it forks) with a parent-death signal, and every
stop or crash ends with SIGKILL to that group. Each start gets its own shared-memory prefix
for the Python backend, so the regions of a crashed Triton can be found and removed.
``TritonSupervisor`` restarts a Triton that died, with backoff.

A *locked* Triton (``TritonServer(..., locked=True)``, what ``pe-rank serve`` starts when it
authenticates its own callers) answers only the process that started it: its gRPC endpoint
requires mutual TLS with a client certificate made for this Triton alone (:class:`TritonLock`:
a fresh CA, server and client certificate in a private 0700 folder, removed on stop), its
HTTP endpoint is off, and its readiness is asked over that gRPC channel. Triton's own
``--grpc-restricted-protocol`` header would put its secret on Triton's command line, which
every local user can read in ``/proc/PID/cmdline``; file permissions keep these keys to the
server's user. The metrics endpoint (read-only counters) stays open on loopback: Triton 2.51
has no way to lock it.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import glob
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
import uuid
from pathlib import Path
from typing import Callable
from ..core.errors import UserError

log = logging.getLogger("pe_rank.triton")
_ERROR_LINE = re.compile(r"^E\d{4} |failed to load|UNAVAILABLE|error:", re.IGNORECASE)
_NOISE = ("CudaDriverHelper", "CUDA driver version is insufficient", "unable to create stream")


class TritonStartError(RuntimeError):
    """Triton did not become ready; the message carries Triton's own error lines."""


SHM_DIR = Path("/dev/shm")

# Triton is started through this tiny exec wrapper, not a preexec_fn: a preexec_fn forces a plain fork()
# of this process, whose gRPC (the pool's channels, a test's clients) then runs its fork handlers in the
# child, and under load that child sometimes aborted before it could exec ("Epoll1Poller encountered
# epoll_wait error: Bad file descriptor", Triton "exited with code -6"). Without one, subprocess uses
# vfork, which runs no fork handler; the wrapper sets the parent-death signal, checks its parent is still
# the one that started it, and execs Triton (the signal survives exec).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the parent died before the signal was set\n"
    "os.execve(sys.argv[2], sys.argv[2:], os.environ)\n"
)


def _die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGKILL when the thread that started it dies (Linux prctl).

    The signal fires when the *thread* that spawned the child exits, so Triton must be started
    from a thread that lives as long as we want Triton to: the main thread or the supervisor's.
    Elsewhere than Linux the command runs as is (the process group still cleans up).
    """
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def shm_regions(prefix: str) -> list[Path]:
    """The Python backend's shared-memory files of one Triton start (by its region prefix)."""
    return [Path(p) for p in glob.glob(str(SHM_DIR / (glob.escape(prefix) + "*")))]


_OUR_SHM = re.compile(r"^pe_rank_triton_(\d+)_")


def remove_stale_shm() -> list[Path]:
    """Remove the regions of embedded Tritons whose owning process is gone (e.g. SIGKILLed:
    Triton then dies with it, but nothing was left to clean up). Only our own prefix is touched."""
    removed = []
    for path in SHM_DIR.glob("pe_rank_triton_*"):
        match = _OUR_SHM.match(path.name)
        if not match or _pid_running(int(match.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path)
        except (FileNotFoundError, PermissionError):
            pass
    if removed:
        log.info("removed %d shared-memory region(s) left by dead pe-rank processes", len(removed))
    return removed


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


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


def _command_and_env(repository: Path, grpc_port: int, http_port: int | None, metrics_port: int,
                     extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """``http_port`` None: no HTTP address (a locked Triton turns HTTP off)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    http = [] if http_port is None else ["--http-address", "127.0.0.1", "--http-port", str(http_port)]
    args = ["--model-repository", str(repository), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
            *http, "--metrics-address", "127.0.0.1",
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


_OUR_LOCK = re.compile(r"^pe-rank-triton-lock-(\d+)-")


def _remove_stale_locks() -> None:
    """Remove the key folders of locked Tritons whose pe-rank process is gone (SIGKILLed: nothing cleaned up)."""
    for path in Path(tempfile.gettempdir()).glob("pe-rank-triton-lock-*"):
        match = _OUR_LOCK.match(path.name)
        if match and not _pid_running(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


class TritonLock:
    """Mutual TLS for one Triton's gRPC endpoint: a throw-away CA, a server certificate for 127.0.0.1 and
    the one client certificate it accepts, in a private folder (0700; keys 0600) until :meth:`remove`."""

    def __init__(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        _remove_stale_locks()
        self.folder = Path(tempfile.mkdtemp(prefix=f"pe-rank-triton-lock-{os.getpid()}-"))  # mkdtemp: mode 0700
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(subject: str, key, issuer: str, issuer_key, ca: bool, usage=None, san=None) -> x509.Certificate:
            builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(minutes=5))
                       .not_valid_after(now + datetime.timedelta(days=3650))
                       .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if usage is not None:
                builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            if san is not None:
                builder = builder.add_extension(san, critical=False)
            return builder.sign(issuer_key, hashes.SHA256())

        import ipaddress

        ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        ca = cert("pe-rank embedded Triton CA", ca_key, "pe-rank embedded Triton CA", ca_key, True)
        server = cert("127.0.0.1", server_key, "pe-rank embedded Triton CA", ca_key, False,
                      ExtendedKeyUsageOID.SERVER_AUTH,
                      x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                   x509.DNSName("localhost")]))
        client = cert("pe-rank serve", client_key, "pe-rank embedded Triton CA", ca_key, False,
                      ExtendedKeyUsageOID.CLIENT_AUTH)

        def pem_key(key) -> bytes:
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())

        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.client_cert_pem = client.public_bytes(serialization.Encoding.PEM)
        self.client_key_pem = pem_key(client_key)
        for file, data in (("ca.pem", self.ca_pem), ("server.pem", server.public_bytes(serialization.Encoding.PEM)),
                           ("server.key", pem_key(server_key))):
            path = self.folder / file
            path.touch(mode=0o600)
            path.write_bytes(data)

    def triton_args(self) -> list[str]:
        return ["--grpc-use-ssl-mutual=true", f"--grpc-server-cert={self.folder / 'server.pem'}",
                f"--grpc-server-key={self.folder / 'server.key'}", f"--grpc-root-cert={self.folder / 'ca.pem'}",
                "--allow-http=false"]

    def credentials(self):
        """gRPC channel credentials of the one client this Triton accepts."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.client_key_pem,
                                            certificate_chain=self.client_cert_pem)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class TritonServer:
    """``with TritonServer(repo) as triton: use(triton.grpc_url)``; stopped on exit and at interpreter exit.

    ``locked=True``: only this process can call it (see :class:`TritonLock`); its calls need
    ``credentials``.
    """

    def __init__(self, repository: Path | str, grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None, extra_args: list[str] | None = None,
                 startup_timeout: float = 180.0, log_file: Path | None = None, locked: bool = False) -> None:
        self.repository = Path(repository).resolve()
        self.lock = TritonLock() if locked else None
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.shm_prefix = ""
        self.started_at = 0.0
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None
        self._atexit = False

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def credentials(self):
        """gRPC channel credentials for a locked Triton, None for an open one."""
        return self.lock.credentials() if self.lock else None

    def start(self) -> "TritonServer":
        """Start and wait until ready; on failure everything it started is gone and TritonStartError says why."""
        remove_stale_shm()
        if self.lock is not None and not self.lock.folder.exists():  # started again after stop()
            self.lock = TritonLock()
        # a fresh prefix per start: a crashed start's regions are never reused, and ours are easy to find
        self.shm_prefix = f"pe_rank_triton_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        extra = list(self.extra_args)
        if not any("shm-region-prefix-name" in a for a in extra):
            extra.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if not any("shm-default-byte-size" in a for a in extra):  # sized from the repository's window shape
            from pe_rank_export.shm import backend_config_args, plan_for_repository

            shm = plan_for_repository(self.repository)
            extra += backend_config_args(shm) if shm is not None else []
        if self.lock is not None:
            extra += self.lock.triton_args()
        cmd, env = _command_and_env(self.repository, self.grpc_port, None if self.lock else self.http_port,
                                    self.metrics_port, extra)
        log.info("starting Triton: %s", " ".join(cmd))
        self.lines.clear()
        self.process = subprocess.Popen(_die_with_parent(cmd), env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        self._reader = threading.Thread(target=self._forward_logs, daemon=True)
        self._reader.start()
        self._wait_ready()
        self.started_at = time.monotonic()
        if self.lock is not None:
            log.info("Triton ready (pid %d): gRPC %s (mutual TLS: this server's calls only), HTTP off, metrics "
                     "127.0.0.1:%d", self.process.pid, self.grpc_url, self.metrics_port)
        else:
            log.info("Triton ready (pid %d): gRPC %s, HTTP %s", self.process.pid, self.grpc_url, self.http_url)
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
            if (self._grpc_ready() if self.lock else self._http_ready()) and self._metrics_listening():
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

    def _metrics_listening(self) -> bool:
        """Triton starts its metrics endpoint after gRPC and HTTP (41 ms later here): ready means all three,
        so nobody who reads the counters right after start meets a refused connection."""
        try:
            socket.create_connection(("127.0.0.1", self.metrics_port), timeout=2).close()
        except OSError:
            return False
        return True

    def _grpc_ready(self) -> bool:
        """A locked Triton (HTTP off), asked over mutual TLS: a port someone else holds cannot show this
        Triton's certificate, so it never looks ready either."""
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        with grpc.secure_channel(self.grpc_url, self.lock.credentials()) as channel:
            try:
                return service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                    service_pb2.ServerReadyRequest(), timeout=2).ready
            except grpc.RpcError:
                return False

    def _fail(self, headline: str) -> None:
        self.cleanup()
        errors = self.error_lines() or list(self.lines)[-20:]
        raise TritonStartError(headline + ":\n" + "\n".join(errors))

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Triton's exit code once it has exited (reaped: no zombie), None if still running after ``timeout``."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        """After Triton exited or to end it: SIGKILL its whole group (the Python stubs are in it
        and may outlive a dead Triton), reap it, and remove its shared-memory regions."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        for path in shm_regions(self.shm_prefix) if self.shm_prefix else []:
            try:
                path.unlink()
                log.info("removed leftover shared memory %s", path)
            except FileNotFoundError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton finishes in-flight requests), SIGKILL after ``timeout``; then :meth:`cleanup`."""
        if self.process is None:
            if self.lock is not None:
                self.lock.remove()
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("Triton did not stop within %.0f s of SIGTERM; killing it", timeout)
            except ProcessLookupError:
                pass
        self.cleanup()
        if self.lock is not None:
            self.lock.remove()

    def kill(self) -> None:
        """Hard stop, for fault-injection tests."""
        if self.process is not None:
            self.cleanup()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TritonSupervisor:
    """Keeps one embedded Triton running: a Triton that dies is cleaned up and started again.

    Restarts wait ``backoff_s``, doubling up to ``max_backoff_s``. A restart that fails, or a
    Triton that dies less than ``stable_s`` after becoming ready, counts as a failure; after
    ``max_failures`` in a row the supervisor gives up and calls ``on_give_up(reason)`` (the
    server then exits non-zero so systemd or Kubernetes restarts the whole thing). A Triton
    that stayed up ``stable_s`` resets the count and the backoff. The ports never change, so
    clients (the service's TritonPool) just see the server come back ready.

    Restarts run on the supervisor's own thread, which lives until :meth:`stop`: the
    parent-death signal of a Triton is tied to the thread that started it.
    """

    def __init__(self, server: TritonServer, max_failures: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0,
                 on_give_up: Callable[[str], None] | None = None) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.server = server
        self.max_failures, self.backoff_s, self.max_backoff_s, self.stable_s = (
            max_failures, backoff_s, max_backoff_s, stable_s)
        self.on_give_up = on_give_up
        self.restarts = 0  # successful restarts, for logs and tests
        self.failures = 0  # in a row
        self.gave_up: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def start(self) -> "TritonSupervisor":
        """First start in the caller's thread (TritonStartError as usual), then watch it."""
        self.server.start()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        backoff = self.backoff_s
        while not self._stopping.is_set():
            code = self.server.wait(timeout=0.5)
            if code is None or self._stopping.is_set():
                continue
            uptime = time.monotonic() - self.server.started_at
            self.server.cleanup()  # stubs and shared memory of the dead instance
            if uptime >= self.stable_s:
                self.failures, backoff = 0, self.backoff_s
            else:
                self.failures += 1
            log.error("Triton (pid %d) exited with code %s after %.0f s; %d failure(s) in a row",
                      self.server.process.pid, code, uptime, self.failures)
            while not self._stopping.is_set():
                if self.failures >= self.max_failures:
                    self._give_up(f"Triton failed {self.failures} time(s) in a row (limit {self.max_failures})")
                    return
                log.warning("restarting Triton in %.1f s", backoff)
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
                try:
                    self.server.start()
                except TritonStartError as exc:
                    self.failures += 1
                    log.error("Triton restart failed (%d in a row): %s", self.failures, exc)
                    continue
                except OSError as exc:  # e.g. the binary vanished
                    self.failures += 1
                    log.error("Triton restart failed (%d in a row): %s", self.failures, exc)
                    continue
                self.restarts += 1
                log.info("Triton restarted (restart %d)", self.restarts)
                break

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        log.critical("%s; giving up", reason)
        if self.on_give_up is not None:
            self.on_give_up(reason)

    def stop(self, timeout: float = 30.0) -> None:
        """No more restarts; stop Triton (and one the watcher may be starting right now)."""
        self._stopping.set()
        self.server.stop(timeout)
        while self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(0.5)
            self.server.stop(timeout)  # a start that raced with the first stop
        self.server.stop(timeout)

    def __enter__(self) -> "TritonSupervisor":
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
        raise UserError(str(exc)) from None
    return 0
