"""runtime/trt_backend.py and export/trt.py against TensorRT's Python-binding conventions, on CPU.

No TensorRT here, so the engine, execution context, builder config and CUDA streams are hand-written
stand-ins that follow python/src/infer/pyCore.cpp: set_optimization_profile_async raises RuntimeError
(never returns False), set_input_shape / set_tensor_address / set_timing_cache / execute_async_v3
return False on failure. This proves the backend's calls and their order, not TensorRT's behaviour.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.errors import ModelError


class FakeStream:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name, self.cuda_stream = log, name, 0

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait", other.name))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name))


class FakeContext:
    def __init__(self, log: list, io_names: list[str], vocab: int, refuse: tuple[str, ...] = ()) -> None:
        self.log, self.io_names, self.vocab, self.refuse = log, io_names, vocab, refuse
        self.batch = 0

    def set_input_shape(self, name, shape) -> bool:
        if name == "input_ids":
            self.batch = shape[0]
        return name in self.io_names

    def set_tensor_address(self, name, address) -> bool:
        self.log.append(("address", name))
        return name in self.io_names and name not in self.refuse

    def get_tensor_shape(self, name):
        return (self.batch, 1, self.vocab)

    def execute_async_v3(self, stream) -> bool:
        self.log.append(("execute",))
        return True


def _backend(monkeypatch, log: list, extra_io: tuple[str, ...] = (), refuse: tuple[str, ...] = ()):
    from runtime.trt_backend import TensorRTBackend

    config = GPTConfig.preset("tiny")
    io = ["input_ids", "attention_mask", "position_ids", "logits"]
    io += [f"{kind}.{i}.{t}" for kind in ("cache", "cache_out") for i in range(config.n_layer)
           for t in ("key", "value")]
    producer = FakeStream(log, "producer")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: producer)
    b = object.__new__(TensorRTBackend)
    b.config, b.static_cache, b.manifest = config, True, types.SimpleNamespace(logits="last")  # EngineManifest.logits
    b.device, b.dtype, b.max_seq_len, b.max_batch = torch.device("cpu"), torch.float32, 32, 4
    b.stream = FakeStream(log, "backend")
    ctx = FakeContext(log, io + list(extra_io), config.vocab_size, refuse)
    b.contexts = {0: ctx, 1: ctx}
    b.io_names = io + list(extra_io)
    b._prefill, b._decode, b.capacity, b.rows, b.cache_len = 0, 1, 0, 0, 0
    b._ids, b._mask, b._pos = (torch.zeros(b.max_batch * b.max_seq_len, dtype=torch.int64) for _ in range(3))
    b.reset(2, 32)
    return b


def _step(b):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    return b.prefill(ids, torch.ones(2, 3, dtype=torch.int64), torch.arange(3).repeat(2, 1))


def test_input_copies_wait_for_the_callers_stream(monkeypatch):
    log: list = []
    b = _backend(monkeypatch, log)
    real_copy = torch.Tensor.copy_

    def logged_copy(self, src, non_blocking=False):
        log.append(("copy",))
        return real_copy(self, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", logged_copy)
    log.clear()
    _step(b)
    first_copy = log.index(("copy",))
    assert ("wait", "producer") in log[:first_copy], log[:first_copy + 1]


def test_every_io_tensor_has_an_address_before_execute(monkeypatch):
    log: list = []
    _step(_backend(monkeypatch, log))
    execute = log.index(("execute",))
    bound = {e[1] for e in log[:execute] if e[0] == "address"}
    assert {"input_ids", "attention_mask", "position_ids", "logits", "cache.0.key", "cache_out.1.value"} <= bound

    log = []
    b = _backend(monkeypatch, log, extra_io=("debug_output",))  # an engine output the backend does not know
    with pytest.raises(RuntimeError, match="debug_output"):
        _step(b)
    assert ("execute",) not in log


def test_a_refused_address_is_an_error(monkeypatch):
    b = _backend(monkeypatch, [], refuse=("cache_out.0.key",))
    with pytest.raises(RuntimeError, match="cache_out.0.key"):
        _step(b)


def test_profile_selection_failure_is_a_one_line_error():
    from runtime.trt_backend import create_context

    class Context:
        def set_optimization_profile_async(self, profile, stream):
            raise RuntimeError("Error in set optimization profile async.")  # pyCore.cpp's PY_ASSERT_RUNTIME_ERROR

    class Engine:
        num_optimization_profiles = 1

        def create_execution_context(self):
            return Context()

    with pytest.raises(ModelError, match="optimization profile 1 .*has 1"):
        create_context(Engine(), 1, 0, Path("x.plan"))


def test_a_refused_timing_cache_is_an_error(tmp_path):
    from export.trt import use_timing_cache

    class Config:
        def create_timing_cache(self, data):
            return object()

        def set_timing_cache(self, cache, ignore_mismatch):
            return False  # IBuilderConfig::setTimingCache: "true if set successfully, false otherwise"

    with pytest.raises(ModelError, match="refused this timing cache"):
        use_timing_cache(Config(), tmp_path / "trt.cache")


def _profiles_with(phase: int, name: str, shapes: list[tuple[int, ...]]):
    from export.trt import profile_shapes

    profiles = profile_shapes(GPTConfig.preset("tiny"), True, max_batch=4, max_seq_len=32)
    profiles[phase][name] = shapes
    return profiles


def test_profiles_through_the_standin_builder():
    from export.trt import add_profiles, profile_shapes
    from tests.support.trt_standin import Builder

    builder = Builder()
    config = builder.create_builder_config()
    shapes = profile_shapes(GPTConfig.preset("tiny"), True, max_batch=4, max_seq_len=32)
    add_profiles(builder, config, shapes, set(shapes[0]), "model.plugins.onnx")
    assert [p.shapes["input_ids"]["max"] for p in config.profiles] == [(4, 32), (4, 1)]


@pytest.mark.parametrize("phase, shapes, message", [
    # a rank unlike the one set before: set_shape raises RuntimeError (pyCore.cpp opt_profile_set_shape)
    (1, [(1, 1), (4, 1, 1), (4, 1)], r"optimization profile 1 \(decode\): input input_ids min \(1, 1\) .*"
                                     r"TensorRT: Shape provided for opt is inconsistent with other shapes\.$"),
    # min > max: accepted by set_shape, then add_optimization_profile returns -1 (NvInfer.h)
    (0, [(4, 8), (4, 8), (1, 8)], r"optimization profile 0 \(prefill\): TensorRT refused the profile as invalid "
                                   r"\(min <= opt <= max fails for: input_ids\)$"),
])
def test_profile_errors_name_profile_and_input(phase, shapes, message):
    from export.trt import add_profiles
    from tests.support.trt_standin import Builder

    builder = Builder()
    profiles = _profiles_with(phase, "input_ids", shapes)
    with pytest.raises(ModelError, match=message) as e:
        add_profiles(builder, builder.create_builder_config(), profiles, set(profiles[0]), "model.plugins.onnx")
    assert "\n" not in str(e.value)


def test_an_unreadable_timing_cache_is_an_error(tmp_path):
    from export.trt import use_timing_cache
    from tests.support.trt_standin import IBuilderConfig

    path = tmp_path / "trt.cache"
    cache = use_timing_cache(IBuilderConfig(), path)  # no file: a new cache (size 0, NvInfer.h createTimingCache)
    path.write_bytes(cache.serialize())
    use_timing_cache(IBuilderConfig(), path)  # its own blob reads back
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="cannot read this timing cache .*delete the file"):
        use_timing_cache(IBuilderConfig(), path)


def test_oversized_plugin_grid_is_refused_at_build_time():
    from export.trt import check_plugin_grids

    config = GPTConfig.preset("tiny")
    check_plugin_grids(config, 4096, config.block_size)  # the largest engine export.trt allows fits
    with pytest.raises(ModelError, match="exceeds CUDA's limits"):
        check_plugin_grids(config, 4096, 16 * 70000)
