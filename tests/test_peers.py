"""The llama.cpp and OpenVINO peers of the benchmark: a missing peer is a skipped row with the reason, and the
Hugging Face GPT-2 folder they are converted from holds the same model. The conversions themselves run where
`make peers` was run (skipped elsewhere: CI never builds llama.cpp)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from model.config import GPTConfig
from model.errors import ModelError
from model.gpt import GPT
from model.load import load_model, save_hf_folder
from model.tokenizer import char_tokenizer, gpt2_tokenizer
from tests.helpers import greedy_with_cache

HF_LOGITS_ATOL = 1e-4  # fp32 logits, same weights, two implementations (as tests/test_benchmarks.py)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, **overrides)).eval()


def open_row(backend: str, tmp_path, model_src: str = "demo") -> None:
    from benchmarks.worker import open_for_bench

    open_for_bench({"backend": backend, "model_src": model_src, "artifact": str(tmp_path), "threads": 1,
                    "workdir": str(tmp_path), "prefill_lens": [16], "decode_prompt_len": 8, "new_tokens": 8})


@pytest.mark.parametrize("backend,module", [("llama-q4_0", "llama_cpp"), ("ov-int4", "openvino"),
                                            ("ov-int8", "openvino_genai"), ("ov-int4", "nncf")])
def test_missing_peer_package_is_skipped_with_the_reason(backend, module, monkeypatch, tmp_path):
    from benchmarks.worker import Unavailable

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "")
    with pytest.raises(Unavailable, match="not installed"):
        open_row(backend, tmp_path)


def fake_llama_cpp(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.0.test"))
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "")  # restored afterwards (peer_llama sets it)


def test_llama_without_make_peers_is_skipped_with_the_reason(monkeypatch, tmp_path):
    from benchmarks.worker import Unavailable

    fake_llama_cpp(monkeypatch)  # the package is there, the converter and tools are not
    monkeypatch.setenv("GPTDEPLOY_PEERS_DIR", str(tmp_path / "peers"))
    with pytest.raises(Unavailable, match=r"0\.0\.test's converter and tools are not in .*make peers"):
        open_row("llama-q8_0", tmp_path)


def test_llama_on_a_char_vocabulary_is_skipped_with_the_reason(monkeypatch, tmp_path):
    from benchmarks.worker import Unavailable

    fake_llama_cpp(monkeypatch)
    peers = tmp_path / "peers"
    for f in ("src/llama_cpp_python-0.0.test/vendor/llama.cpp/convert_hf_to_gguf.py", "llama-build/bin/llama-quantize"):
        (peers / f).parent.mkdir(parents=True, exist_ok=True)
        (peers / f).write_text("")
    monkeypatch.setenv("GPTDEPLOY_PEERS_DIR", str(peers))
    with pytest.raises(Unavailable, match="GPT-2 BPE tokenizer, not 'char'"):
        open_row("llama-q4_0", tmp_path, model_src="demo")  # the demo model speaks characters


def test_hf_folder_round_trips_to_the_same_logits(tmp_path):
    model = tiny_gpt2(gelu="erf")
    save_hf_folder(model, gpt2_tokenizer(), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["n_ctx"] == cfg["n_positions"] == 128 and cfg["activation_function"] == "gelu"
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert tuple(state["transformer.h.0.attn.c_attn.weight"].shape) == (64, 192)  # Conv1D: [in, out]
    assert "lm_head.weight" not in state  # tied to wte
    back, tok = load_model(tmp_path / "hf")
    assert back.config == model.config and tok.spec == {"type": "gpt2"}
    x = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(back(x)[0], model(x)[0], atol=1e-5, rtol=0)


def test_hf_folder_is_what_transformers_reads(tmp_path):
    """The layout is transformers' own, not only the inverse of our loader: GPT2LMHeadModel gives the same logits."""
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2(seed=3)
    save_hf_folder(model, gpt2_tokenizer(), tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=HF_LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("overrides,tokenizer,match", [
    ({"bias": False}, "gpt2", "bias=False"),
    ({"vocab_size": 64}, "char", "GPT-2 BPE tokenizer, not 'char'")])
def test_hf_folder_refuses_what_gpt2_cannot_hold(overrides, tokenizer, match, tmp_path):
    tok = gpt2_tokenizer() if tokenizer == "gpt2" else char_tokenizer([chr(65 + i) for i in range(64)])
    with pytest.raises(ModelError, match=match):
        save_hf_folder(tiny_gpt2(**overrides), tok, tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()


# ---- where `make peers` was run

def llama_or_skip():
    from benchmarks import peer_llama
    from benchmarks.peers import PeerUnavailable

    try:
        peer_llama.llama_tools()
    except PeerUnavailable as e:
        pytest.skip(str(e))
    return peer_llama


def test_llama_f32_gguf_decodes_like_torch(tmp_path):
    """Our weights through llama.cpp's converter at f32: the same greedy tokens as the torch reference, every row
    of a batch (random weights have near-ties, so the model's weights are scaled up to make the argmax clear)."""
    peer_llama = llama_or_skip()
    model = tiny_gpt2(seed=5)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)
    save = tmp_path / "ckpt"
    from model.load import save_checkpoint

    save_checkpoint(model, gpt2_tokenizer(), save)
    llm = peer_llama.open_llama(str(save), "f32", 1, tmp_path)
    prompt = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(4))
    timed = llm.generate(prompt.numpy(), 8)
    want = greedy_with_cache(model, prompt, 8)
    assert timed.tokens == want[0].tolist() and timed.decode_tokens == 7 * 3
    batch1 = llm.generate(prompt[2:].numpy(), 8)  # a new context for one row: row 2 alone decodes the same
    assert batch1.tokens == want[2].tolist()
    q4 = peer_llama.to_gguf(str(save), "q4_0", tmp_path)
    # (llama-quantize keeps the tied embedding, most of this tiny model, at 6 bits)
    assert q4.stat().st_size < 0.4 * (tmp_path / "llama-f32.gguf").stat().st_size


def test_openvino_stateful_conversion_decodes_like_torch(demo_onnx, tmp_path):
    """Our fp32 graph made stateful (beam_idx + one variable per past/present pair) decodes the trained demo
    model's greedy tokens on every row, at f32; NNCF int4 makes the weights file smaller."""
    pytest.importorskip("openvino_genai")
    import openvino_genai as og

    from benchmarks import peer_openvino

    fp32 = peer_openvino.convert(str(demo_onnx), "fp32", tmp_path / "fp32")
    pipe = og.LLMPipeline(str(fp32), "CPU", ATTENTION_BACKEND=peer_openvino.ATTENTION_BACKEND,
                          INFERENCE_PRECISION_HINT="f32", INFERENCE_NUM_THREADS=1)
    model, tok = load_model("demo")
    prompt = torch.tensor([tok.encode("ROMEO:\nWhat say"), tok.encode("JULIET:\nO, tell")])
    timed = peer_openvino.run_openvino(pipe, prompt.numpy(), 24)
    assert timed.tokens == greedy_with_cache(model, prompt, 24)[0].tolist()
    row1 = peer_openvino.run_openvino(pipe, prompt[1:].numpy(), 24)  # the state is reset between calls
    assert row1.tokens == greedy_with_cache(model, prompt[1:], 24)[0].tolist()
    int4 = peer_openvino.convert(str(demo_onnx), "int4", tmp_path / "int4")
    size = lambda d: (d / "openvino_model.bin").stat().st_size  # noqa: E731
    assert size(int4) < 0.4 * size(fp32)
