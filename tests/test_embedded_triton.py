"""The embedded Triton launcher: readiness, Triton's own errors on a failed load, clean stop,
supervision (restart after a crash, give up after N failures), no orphans, no leftover shm."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tclient

from pe_rank.service.embedded_triton import SHM_DIR, TritonServer, TritonStartError, TritonSupervisor, shm_regions

pytestmark = pytest.mark.triton

ADD_ONE = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            {init}

        def execute(self, requests):
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x + 1).astype(np.float32))]))
            return out
''')
CONFIG = '''name: "add_one"
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_CPU } ]
'''


def repository(root, init: str = "pass"):
    model = root / "add_one"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(ADD_ONE.replace("{init}", init))
    return root


def test_serves_and_stops_without_leftovers(tmp_path):
    with TritonServer(repository(tmp_path)) as triton:
        with tclient.InferenceServerClient(triton.grpc_url) as client:
            x = tclient.InferInput("X", [2, 3], "FP32")
            x.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
            y = client.infer("add_one", [x]).as_numpy("Y")
        np.testing.assert_array_equal(y, np.arange(1, 7, dtype=np.float32).reshape(2, 3))
        pid = triton.process.pid
    assert not triton.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_python_models_can_import_ssl_using_packages(tmp_path):
    """The stub must run on this interpreter's libpython (transformers pulls in ssl)."""
    with TritonServer(repository(tmp_path, init="import ssl, transformers")) as triton:
        assert triton.is_alive()


def test_failed_model_load_reports_tritons_own_error(tmp_path):
    server = TritonServer(repository(tmp_path, init='raise RuntimeError("bad weights in model 42")'))
    with pytest.raises(TritonStartError, match="bad weights in model 42"):
        server.start()
    assert not server.is_alive()


def test_cli_prints_a_one_line_error_for_a_broken_repository(tmp_path):
    repository(tmp_path, init='raise RuntimeError("no such file: weights.bin")')
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "triton", "--repository", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert "no such file: weights.bin" in proc.stderr and "Traceback" not in proc.stderr


def test_a_taken_port_reports_tritons_own_error(tmp_path):
    with TritonServer(repository(tmp_path / "a")) as running:
        clash = TritonServer(repository(tmp_path / "b"), grpc_port=running.grpc_port, startup_timeout=60)
        with pytest.raises(TritonStartError) as err:
            clash.start()
        assert "already in use" in str(err.value)
        assert running.is_alive()


def test_a_taken_metrics_port_fails_the_start_instead_of_looking_ready(tmp_path):
    """Triton opens its metrics port last, after gRPC and HTTP already answer ready, and exits if that port is
    taken: start() must wait for all three, or it hands back a Triton that is about to exit (it did, 4 of 4)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: Triton cannot bind it, and nothing answers there
        triton = TritonServer(repository(tmp_path), metrics_port=taken.getsockname()[1], startup_timeout=60)
        with pytest.raises(TritonStartError) as err:
            triton.start()
    assert "failed to start Metrics service" in str(err.value)
    assert not triton.is_alive()


# ---- processes as the kernel sees them (no psutil needed)

def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no memory or CPU; reaping orphans is PID 1's job)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (Triton and the Python stubs it forked)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out


def wait_until(predicate, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.1)


def add_one(url: str) -> np.ndarray:
    with tclient.InferenceServerClient(url) as client:
        x = tclient.InferInput("X", [1, 2], "FP32")
        x.set_data_from_numpy(np.array([[1, 2]], dtype=np.float32))
        return client.infer("add_one", [x]).as_numpy("Y")


def test_triton_runs_in_its_own_group_with_its_shm_under_our_prefix(tmp_path):
    with TritonServer(repository(tmp_path)) as triton:
        pid = triton.process.pid
        assert os.getpgid(pid) == pid
        members = group_members(pid)
        assert len(members) >= 2, "the Python stub should be in Triton's group"
        regions = shm_regions(triton.shm_prefix)
        assert regions and all(r.parent == SHM_DIR for r in regions)
    assert not [m for m in members if running(m)]
    assert not shm_regions(triton.shm_prefix)


def test_supervisor_restarts_a_killed_triton_without_orphans_or_leftover_shm(tmp_path):
    supervisor = TritonSupervisor(TritonServer(repository(tmp_path)), backoff_s=0.2)
    with supervisor:
        first = supervisor.server.process.pid
        first_group, first_prefix = group_members(first), supervisor.server.shm_prefix
        assert len(first_group) >= 2 and shm_regions(first_prefix)
        os.kill(first, signal.SIGKILL)  # Triton alone, as a crash would: its stub is orphaned
        wait_until(lambda: supervisor.restarts == 1, 120, "Triton restarted")
        np.testing.assert_array_equal(add_one(supervisor.grpc_url), [[2, 3]])  # same port as before
        assert not [m for m in first_group if running(m)], "the crashed Triton's stub outlived it"
        assert not shm_regions(first_prefix), "the crashed Triton's shared memory is still there"
        second, second_prefix = supervisor.server.process.pid, supervisor.server.shm_prefix
        assert second != first and second_prefix != first_prefix and shm_regions(second_prefix)
        second_group = group_members(second)
        assert supervisor.failures == 1 and supervisor.gave_up is None
    assert not [m for m in second_group if running(m)]
    assert not shm_regions(second_prefix)


def test_supervisor_gives_up_after_n_failures_in_a_row(tmp_path):
    repo = repository(tmp_path / "repo")
    gave_up = threading.Event()
    reasons = []
    supervisor = TritonSupervisor(TritonServer(repo), max_failures=3, backoff_s=0.1,
                                  on_give_up=lambda reason: (reasons.append(reason), gave_up.set()))
    with supervisor:
        pid = supervisor.server.process.pid
        repo.rename(tmp_path / "gone")  # every restart now fails: no model repository
        os.kill(pid, signal.SIGKILL)
        assert gave_up.wait(120), "the supervisor never gave up"
        assert supervisor.failures == 3 and supervisor.restarts == 0
        assert "3 time(s) in a row" in reasons[0]
        assert not supervisor.server.is_alive()
        assert not group_members(supervisor.server.process.pid)


def test_a_stable_triton_resets_the_failure_count(tmp_path):
    supervisor = TritonSupervisor(TritonServer(repository(tmp_path)), max_failures=1, backoff_s=0.1, stable_s=0.5)
    with supervisor:
        time.sleep(1.0)  # up longer than stable_s: its death is not counted against it
        os.kill(supervisor.server.process.pid, signal.SIGKILL)
        wait_until(lambda: supervisor.restarts == 1, 120, "Triton restarted")
        assert supervisor.failures == 0 and supervisor.gave_up is None


DIES_WITH_PARENT = textwrap.dedent("""
    import sys, time
    from pe_rank.service.embedded_triton import TritonServer
    triton = TritonServer(sys.argv[1]).start()
    print(triton.process.pid, triton.shm_prefix, flush=True)
    time.sleep(600)
""")


def _triton_in_a_child(repo) -> tuple[subprocess.Popen, int, str]:
    parent = subprocess.Popen([sys.executable, "-c", DIES_WITH_PARENT, str(repo)], stdout=subprocess.PIPE, text=True)
    pid, prefix = parent.stdout.readline().split()
    return parent, int(pid), prefix


def test_triton_and_its_stubs_die_with_a_killed_parent(tmp_path):
    parent, pid, prefix = _triton_in_a_child(repository(tmp_path))
    try:
        members = group_members(pid)
        assert len(members) >= 2 and shm_regions(prefix)
    finally:
        parent.kill()  # SIGKILL: no atexit, no cleanup code of ours runs
        parent.wait()
    wait_until(lambda: not [m for m in members if running(m)], 30, "Triton and its stub gone with their parent")
    # Triton died of the parent-death signal; its stub saw that and exited, removing its own region
    wait_until(lambda: not shm_regions(prefix), 10, "the stub's shared memory removed")


def test_the_next_start_removes_shm_regions_of_a_killed_server(tmp_path):
    """Everything SIGKILLed at once (the OOM killer, kill -9 of the whole tree): nobody cleans up."""
    parent, pid, prefix = _triton_in_a_child(repository(tmp_path / "a"))
    try:
        members = group_members(pid)
        os.killpg(pid, signal.SIGKILL)
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not [m for m in members if running(m)], 30, "all killed")
    assert shm_regions(prefix), "a SIGKILLed stub cannot remove its region"
    with TritonServer(repository(tmp_path / "b")) as triton:
        assert not shm_regions(prefix), "a new start removes regions whose owner is dead"
        assert shm_regions(triton.shm_prefix), "but not those of live servers"
