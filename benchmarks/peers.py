"""The CPU peers in the benchmark, each driven through its own API and timed like our rows:

- CTranslate2 (fp32, int8): the same weights converted offline with its own model spec API, the way its
  Transformers converter's GPT-2 loader fills TransformerDecoderModelSpec (pre-norm decoder, learned
  positions, GELU tanh|erf, lm_head = wte), then quantized by its own `optimize(quantization=...)`;
- ONNX Runtime GenAI: our artifact as exported (genai_config.json written by export/genai.py), with its
  intra-op threads set the way the other rows' are.

Both are optional: a missing package makes the row "skipped" with the reason. Every runner returns the
worker's Timed (benchmarks/stats.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import Timed
from export.genai import GENAI_CONFIG
from model.load import load_model


class PeerUnavailable(Exception):
    """The peer's package is not installed (the row is skipped with this reason)."""


def _token_strings(vocab_size: int) -> list[str]:
    # CTranslate2 speaks in token strings; ids written as strings keep id i at row i of the vocabulary
    return [str(i) for i in range(vocab_size)]


def convert_ct2(model: Any, out_dir: Path, quantization: str | None) -> None:
    """Our GPT -> a CTranslate2 decoder model folder (weights as PyTorch holds them, nothing retrained)."""
    from ctranslate2.specs import common_spec, transformer_spec

    c = model.config
    activation = common_spec.Activation.GELUTanh if c.gelu == "tanh" else common_spec.Activation.GELU
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(c.n_layer, c.n_head, pre_norm=True,
                                                                    activation=activation)
    t = model.transformer
    dec = spec.decoder
    dec.scale_embeddings = False
    to_np = lambda p: p.detach().float().contiguous().numpy()  # noqa: E731

    def layer_norm(s: Any, m: Any) -> None:
        s.gamma = to_np(m.weight)
        s.beta = to_np(m.bias) if m.bias is not None else np.zeros(c.n_embd, np.float32)

    def linear(s: Any, m: Any) -> None:  # nn.Linear [out, in] is CTranslate2's layout too
        s.weight = to_np(m.weight)
        if m.bias is not None:
            s.bias = to_np(m.bias)

    dec.embeddings.weight = to_np(t.wte.weight)
    dec.position_encodings.encodings = to_np(t.wpe.weight)
    layer_norm(dec.layer_norm, t.ln_f)
    for s, block in zip(dec.layer, t.h):
        layer_norm(s.self_attention.layer_norm, block.ln_1)
        linear(s.self_attention.linear[0], block.attn.c_attn)
        linear(s.self_attention.linear[1], block.attn.c_proj)
        layer_norm(s.ffn.layer_norm, block.ln_2)
        linear(s.ffn.linear_0, block.mlp.c_fc)
        linear(s.ffn.linear_1, block.mlp.c_proj)
    dec.projection.weight = to_np(t.wte.weight)
    spec.register_vocabulary(_token_strings(c.vocab_size))
    spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = "0"
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(out_dir))


def open_ct2(model_src: str, quantization: str, threads: int | None, workdir: Path) -> Any:
    """-> a ctranslate2.Generator on the CPU (compute type = the quantization: float32 or int8)."""
    try:
        import ctranslate2
    except ImportError:
        raise PeerUnavailable("CTranslate2 is not installed (pip install ctranslate2)") from None
    model, _ = load_model(model_src)
    out = Path(tempfile.mkdtemp(prefix=f"ct2-{quantization}-", dir=workdir))
    convert_ct2(model, out, None if quantization == "float32" else quantization)
    del model
    return ctranslate2.Generator(str(out), device="cpu", compute_type=quantization,
                                 intra_threads=threads or 0, inter_threads=1)


def run_ct2(generator: Any, prompt: Any, new_tokens: int) -> Timed:
    """Greedy, exactly new_tokens per row (min_length = max_length: no early end token). The callback sees
    every token as it is produced: prefill ends at the first one, decode at the last."""
    prompt = np.asarray(prompt)
    times: list[float] = []
    t0 = time.perf_counter()
    out = generator.generate_batch([[str(int(t)) for t in row] for row in prompt], max_length=new_tokens,
                                   min_length=new_tokens, sampling_topk=1, beam_size=1,
                                   include_prompt_in_result=False,
                                   callback=lambda step: times.append(time.perf_counter()) and False)
    first_token = times[len(prompt) - 1] if len(times) >= len(prompt) else times[0]
    tokens = out[0].sequences_ids[0]
    if len(tokens) != new_tokens:
        raise RuntimeError(f"CTranslate2 generated {len(tokens)} tokens, not {new_tokens}")
    return Timed(first_token - t0, (new_tokens - 1) * len(prompt), times[-1] - first_token, list(tokens))


def open_genai(artifact: str, threads: int | None, workdir: Path) -> Any:
    """onnxruntime_genai.Model over the artifact; the same files, with the intra-op threads set in a copy of
    genai_config.json (the other files are linked, not copied)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise PeerUnavailable("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from None
    src = Path(artifact)
    if not (src / GENAI_CONFIG).is_file():
        raise RuntimeError(f"{src}: no {GENAI_CONFIG} (exported before genai support?)")
    view = Path(tempfile.mkdtemp(prefix="genai-", dir=workdir))
    for f in src.iterdir():
        if f.name != GENAI_CONFIG:
            os.symlink(f.resolve(), view / f.name)
    cfg = json.loads((src / GENAI_CONFIG).read_text())
    if threads:
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (view / GENAI_CONFIG).write_text(json.dumps(cfg))
    return og.Model(str(view))


def run_genai(model: Any, prompt: Any, new_tokens: int) -> Timed:
    """Greedy through genai's own loop: append_tokens runs the prompt, each generate_next_token picks a token
    (and, from the second on, first runs the model on the previous one)."""
    import onnxruntime_genai as og

    prompt = np.asarray(prompt, dtype=np.int32)
    B, P = prompt.shape
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=P + new_tokens, min_length=P + new_tokens, do_sample=False,
                              batch_size=B)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
    t2 = time.perf_counter()
    tokens = [int(t) for t in gen.get_sequence(0)[P:]]
    if len(tokens) != new_tokens:
        raise RuntimeError(f"onnxruntime-genai generated {len(tokens)} tokens, not {new_tokens}")
    return Timed(t1 - t0, (new_tokens - 1) * B, t2 - t1, tokens)
