"""The TensorRT engine checks (tests/trt_engine_checks.py), run in a process that compiles Triton kernels.

A full pytest run imports the interpreter tests, which make this process interpret every Triton
kernel (TRITON_INTERPRET=1 is read when @triton.jit decorates, Triton's own library included); a
plugin engine built here would hand register.py interpreted kernels, and triton.compile fails on
them. So the engine checks run in a fresh process; without TensorRT they skip there, except the
check that the process compiles kernels.
"""

from __future__ import annotations

from tests.trt_helpers import run_compiled, tensorrt_reason


def test_engine_checks_in_a_compiling_process():
    proc = run_compiled(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/trt_engine_checks.py"],
                        timeout=3000)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    if tensorrt_reason() is not None:
        assert "1 passed" in proc.stdout and "skipped" in proc.stdout, proc.stdout[-2000:]
