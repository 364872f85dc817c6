"""Every backend keeps runtime/backend.py's protocol: the declared attributes, and BackendUsageError for
misuse (a call out of order, a second prefill without reset, shapes that do not fit, more rows or positions
than reset made room for, a row that does not exist), raised before any work so the backend stays usable.

torch and onnxruntime run the demo model for real. tensorrt runs on CPU against the hand-written engine
stand-in of tests/test_trt_backend_calls.py: its engine computes nothing, so it proves the backend's own
checks and not TensorRT's behaviour, and the tests that compare logits skip it.
"""

from __future__ import annotations

import pytest
import torch

from model.errors import ModelError
from runtime.backend import Backend, BackendUsageError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["torch", "onnxruntime", "onnxruntime-ort", "tensorrt"])
def backend(request, monkeypatch):
    from runtime.open_backend import open_backend

    if request.param == "torch":
        return open_backend("torch", "demo")
    if request.param.startswith("onnxruntime"):
        artifact = request.getfixturevalue("demo_ort" if request.param == "onnxruntime-ort" else "demo_onnx")
        return open_backend("onnxruntime", str(artifact), threads=1)
    from tests.test_trt_backend_calls import _backend

    b = _backend(monkeypatch, [])
    b.tokenizer, b.name, b.variant, b._scratch = None, "tensorrt", "test", {}
    b.capacity = b.positions = 0  # as __init__ leaves it: no reset yet
    return b


def computes(backend) -> bool:
    return backend.name != "tensorrt"


def step_inputs(backend, rows: int, seq: int, past: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, backend.config.vocab_size, (rows, seq), generator=g)
    return ids, torch.ones(rows, past + seq, dtype=torch.int64), torch.arange(past, past + seq).repeat(rows, 1)


def prefill(backend, rows: int = 2, seq: int = 3):
    return backend.prefill(*step_inputs(backend, rows, seq))


def decode(backend, rows: int = 2):
    return backend.decode_one_token(*step_inputs(backend, rows, 1, past=backend.cache_len, seed=1))


def test_declares_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert isinstance(backend.name, str) and isinstance(backend.device, torch.device)
    assert isinstance(backend.dtype, torch.dtype)
    assert isinstance(backend.max_seq_len, int) and 1 <= backend.max_seq_len <= backend.config.block_size
    assert backend.max_batch is None or backend.max_batch >= 1
    info = backend.describe()
    assert info["name"] == backend.name and info["device"] == str(backend.device)
    assert issubclass(BackendUsageError, ModelError)  # CLIs print it as one `error:` line


def test_prefill_needs_reset(backend):
    with pytest.raises(BackendUsageError, match="reset"):
        prefill(backend)


def test_a_second_prefill_needs_reset_on_every_backend(backend):
    backend.reset(2, 16)
    first = prefill(backend)
    with pytest.raises(BackendUsageError, match="prefill on a running batch"):
        prefill(backend)
    backend.reset(2, 16)
    again = prefill(backend)
    if computes(backend):
        torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_decode_needs_a_running_batch(backend):
    backend.reset(2, 16)
    with pytest.raises(BackendUsageError, match="no running batch"):
        decode(backend)


@pytest.mark.parametrize("bad", ["ids 1-D", "ids empty", "mask short", "positions long"])
def test_shapes_that_do_not_fit(backend, bad):
    backend.reset(2, 16)
    ids, mask, pos = step_inputs(backend, 2, 3)
    ids, mask, pos = {"ids 1-D": (ids[0], mask, pos), "ids empty": (ids[:, :0], mask[:, :0], pos[:, :0]),
                      "mask short": (ids, mask[:, 1:], pos), "positions long": (ids, mask, pos.repeat(1, 2))}[bad]
    for call in (backend.prefill, backend.prefill_rows):
        with pytest.raises(BackendUsageError):
            call(ids, mask, pos)
    prefill(backend)
    ids, mask, pos = step_inputs(backend, 2, 1, past=backend.cache_len)
    with pytest.raises(BackendUsageError):
        backend.decode_one_token(ids, mask[:, 1:], pos)
    with pytest.raises(BackendUsageError, match="running batch"):
        backend.decode_one_token(*step_inputs(backend, 1, 1, past=backend.cache_len))


def test_more_rows_than_reset_made_room_for(backend):
    with pytest.raises(BackendUsageError):
        backend.reset(0, 16)
    backend.reset(1, 16)
    with pytest.raises(BackendUsageError, match="1 rows"):
        prefill(backend, rows=2)
    prefill(backend, rows=1)
    _, rows = backend.prefill_rows(*step_inputs(backend, 1, 3))
    with pytest.raises(BackendUsageError, match="1 rows"):
        backend.add_rows(rows)
    assert (backend.rows, backend.cache_len) == (1, 3)


def test_more_positions_than_reset_made_room_for(backend):
    with pytest.raises(BackendUsageError, match="max_seq_len"):
        backend.reset(1, backend.max_seq_len + 1)
    with pytest.raises(BackendUsageError):
        backend.prefill_rows(*step_inputs(backend, 1, backend.max_seq_len + 1))
    backend.reset(2, 4)
    with pytest.raises(BackendUsageError, match="4 positions"):
        prefill(backend, seq=5)
    prefill(backend, seq=4)
    with pytest.raises(BackendUsageError, match="4 positions"):
        decode(backend)
    assert (backend.rows, backend.cache_len) == (2, 4)


def test_rows_and_positions_that_do_not_exist(backend):
    backend.reset(2, 16)
    prefill(backend)
    for row in (2, -1):
        with pytest.raises(BackendUsageError, match="outside the running batch"):
            backend.release_row(row)
    for n in (4, -1):
        with pytest.raises(BackendUsageError, match="cannot trim"):
            backend.trim_left(n)
    assert (backend.rows, backend.cache_len) == (2, 3)


def test_misuse_changes_nothing(backend):
    """Each refused call leaves the running batch as it was: the next decode equals one without them."""
    if not computes(backend):
        pytest.skip("the TensorRT stand-in computes no logits")
    backend.reset(2, 8)
    prefill(backend)
    clean = decode(backend)
    backend.reset(2, 8)
    prefill(backend)
    for misuse in (lambda: prefill(backend), lambda: decode(backend, rows=1), lambda: backend.release_row(2),
                   lambda: backend.trim_left(9), lambda: backend.reset(2, backend.max_seq_len + 1),
                   lambda: backend.decode_one_token(*step_inputs(backend, 2, 1))):
        with pytest.raises(BackendUsageError):
            misuse()
    torch.testing.assert_close(decode(backend), clean, rtol=0, atol=0)
