"""The TensorRT backend's sliding window and row operations (continuous batching) on the trained demo
model, both engine variants: the same checks tests/test_runtime_sliding_window.py and
tests/test_runtime_scheduler.py make on torch and onnxruntime. Needs TensorRT and an NVIDIA GPU."""

from __future__ import annotations

import pytest

from runtime.loop import SamplingParams, generate
from runtime.scheduler import Scheduler
from tests.test_runtime_scheduler import SCRIPT, run_script
from tests.test_runtime_sliding_window import NEW_TOKENS, reference  # noqa: F401 - a fixture
from tests.trt_helpers import requires_tensorrt

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu, requires_tensorrt]


@pytest.fixture(scope="module", params=["plugins", "native"])
def backend(request, tmp_path_factory):
    from export.onnx import export_artifact
    from export.trt import build_engine
    from runtime.trt_backend import TensorRTBackend

    out = tmp_path_factory.mktemp("trt_serving") / "demo"
    export_artifact("demo", out, verify=False, log=lambda s: None)
    plugins = ("attention", "gelu") if request.param == "plugins" else ()
    build_engine(out, plugins, max_batch=4, max_seq_len=128, log=lambda s: None)
    return TensorRTBackend(out, variant=request.param)


def test_sliding_window_greedy_identical_to_nanogpt_generate(backend, reference):  # noqa: F811
    tok = backend.tokenizer
    got = generate(backend, [tok.encode("ROMEO:\n")],
                   SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True, sliding_window=True))
    assert got.tokens[0] == reference("ROMEO:\n")


def test_scheduler_rows_equal_generate_alone(backend):
    scheduler = Scheduler(backend, max_batch=4, max_queue=16)
    done = run_script(scheduler, SCRIPT, lambda n: SamplingParams(max_new_tokens=n, greedy=True))
    tok = backend.tokenizer
    for (text, n, _), c in zip(SCRIPT, done):
        alone = generate(backend, [tok.encode(text)], SamplingParams(max_new_tokens=n, greedy=True))
        assert c.tokens == alone.tokens[0], text
