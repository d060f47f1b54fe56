"""The embedded Triton launcher: readiness, Triton's own errors on a failed load, clean stop."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as tclient

from pe_rank.triton.embedded import TritonServer, TritonStartError

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
