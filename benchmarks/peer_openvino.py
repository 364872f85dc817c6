"""OpenVINO as a CPU peer: our fp32 ONNX artifact read by OpenVINO's own ONNX frontend, its KV cache made
OpenVINO state (what optimum-intel's make_stateful does: a beam_idx input gathers the cache rows, and each
past input / present output pair becomes one variable), its weights compressed by NNCF, then run by
openvino_genai.LLMPipeline from token ids (no text in or out).

optimum-intel is not used: every release that works with our pinned transformers needs an older one, so the
converter here stands in for `optimum-cli export openvino` on the same graph (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers import PeerUnavailable
from benchmarks.stats import Timed
from model.artifact import TOKEN_INPUTS, read_artifact

OV_MODEL = "openvino_model.xml"
ATTENTION_BACKEND = "SDPA"
# weight formats: NNCF's modes, with the same choices as optimum-cli's --weight-format int4 --sym --group-size 128
# --ratio 1.0 and --weight-format int8 (per-channel asymmetric)
WEIGHT_FORMATS = {"int4": dict(mode="INT4_SYM", group_size=128, ratio=1.0), "int8": dict(mode="INT8_ASYM")}


def describe(weight_format: str) -> str:
    f = WEIGHT_FORMATS.get(weight_format)
    if f is None:
        return "fp32 file, OpenVINO's default inference precision"
    return f"NNCF {f['mode'].lower()}" + (f", group {f['group_size']}" if "group_size" in f else ", per channel")


def require_openvino() -> Any:
    try:
        import nncf  # noqa: F401  (weight compression)
        import openvino
        import openvino_genai  # noqa: F401
    except ImportError as e:
        raise PeerUnavailable(f"OpenVINO is not installed ({e.name}; make peers)") from None
    return openvino


def make_stateful(model: Any) -> None:
    """past_key_values.* inputs -> beam_idx-gathered OpenVINO state paired with present.* outputs, in place."""
    import openvino.opset13 as ops
    from openvino import PartialShape, Type
    from openvino._offline_transformations import apply_make_stateful_transformation

    past = [p.get_any_name() for p in model.inputs if p.get_any_name().startswith("past_key_values.")]
    present = {p.get_any_name() for p in model.outputs if p.get_any_name().startswith("present.")}
    pairs = {name: "present." + name.removeprefix("past_key_values.") for name in past}
    if not past or set(pairs.values()) != present:
        raise RuntimeError(f"not a past/present KV-cache graph: inputs {past[:2]}, outputs {sorted(present)[:2]}")
    batch = model.input(TOKEN_INPUTS[0]).get_partial_shape()[0]
    beam_idx = ops.parameter(PartialShape([batch]), Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for name in past:
        port = model.input(name)
        consumers = port.get_target_inputs()
        gather = ops.gather(port, beam_idx, ops.constant(0))
        for c in consumers:
            c.replace_source_output(gather.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, pairs)
    # the state starts empty: zeros of shape [batch of input_ids, heads, 0, head_dim]
    batch_of = ops.gather(ops.shape_of(model.input(TOKEN_INPUTS[0]), output_type="i64"), ops.constant([0]),
                          ops.constant(0))
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [d.min_length for d in op.get_output_partial_shape(0)]
            parts = [batch_of] + [ops.constant(np.array([d], np.int64)) for d in dims[1:]]
            op.set_arguments([ops.broadcast(ops.constant(0.0, dtype=op.get_output_element_type(0)),
                                            ops.concat(parts, axis=0))])
    model.validate_nodes_and_infer_types()


def convert(artifact: str, weight_format: str, out: Path) -> Path:
    """Our fp32 artifact -> OUT/openvino_model.xml (stateful, NNCF-compressed) + the files LLMPipeline reads."""
    ov = require_openvino()
    import nncf

    art = read_artifact(artifact, verify=False)
    if art.spec.quantize:
        raise RuntimeError(f"{artifact}: OpenVINO compresses the fp32 graph itself; give the fp32 artifact")
    model = ov.convert_model(str(art.model_path))
    make_stateful(model)
    if weight_format != "fp32":
        f = WEIGHT_FORMATS[weight_format]
        extra = {k: v for k, v in f.items() if k != "mode"}
        if "group_size" in extra:  # a layer narrower than the group (tiny models) gets a smaller group, not an error
            extra["advanced_parameters"] = nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
        model = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, f["mode"]), **extra)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / OV_MODEL))
    c = art.config
    # LLMPipeline reads the model's shape from config.json and the generation defaults from generation_config.json
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                 "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                                                 "n_positions": c.block_size, "vocab_size": c.vocab_size}))
    # no tokenizer files: LLMPipeline then takes token ids only; the end token only has to be a valid id
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": c.vocab_size - 1}))
    return out


def open_openvino(artifact: str, weight_format: str, threads: int | None, workdir: Path) -> Any:
    """-> openvino_genai.LLMPipeline on the CPU over the converted model (greedy, token ids in and out)."""
    require_openvino()
    import openvino_genai as og

    out = convert(artifact, weight_format, workdir / f"openvino-{weight_format}")
    props = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    # SDPA: the stateful model as converted. The default paged-attention backend caches prompt prefixes across
    # calls, so a repeated benchmark prompt would skip its prefill (measured: 512 tokens in 8-50 ms)
    return og.LLMPipeline(str(out), "CPU", ATTENTION_BACKEND=ATTENTION_BACKEND, **props)


def run_openvino(pipe: Any, prompt: Any, new_tokens: int) -> Timed:
    """One LLMPipeline.generate of all rows. prefill = its own time to first token (perf_metrics: it has no
    per-token callback for batches); decode = the rest of the call's wall time."""
    import openvino as ov
    import openvino_genai as og

    ids = np.ascontiguousarray(np.asarray(prompt, dtype=np.int64))
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = new_tokens
    cfg.do_sample, cfg.ignore_eos = False, True
    inputs = og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    t0 = time.perf_counter()
    res = pipe.generate(inputs, cfg)
    wall = time.perf_counter() - t0
    tokens = [list(map(int, row)) for row in res.tokens]
    if len(tokens) != len(ids) or any(len(t) != new_tokens for t in tokens):
        raise RuntimeError(f"OpenVINO GenAI generated {[len(t) for t in tokens]} tokens per row, not {new_tokens}")
    ttft = res.perf_metrics.get_ttft().mean / 1e3
    return Timed(ttft, (new_tokens - 1) * len(ids), wall - ttft, tokens[0])
