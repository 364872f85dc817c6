"""Parity of an exported artifact against the PyTorch reference.

- verify_decode: a stepper (export/session.ArtifactSession, or any runtime backend) vs the reference over a
  left-padded prefill and several decode steps, teacher-forced with the reference's greedy token.
- parity_report: in the spirit of onnxruntime's gpt2 parity tool, many random graph-level cases
  (batch, past length, new tokens, left padding) -> p50/p99/max |diff|, top-1 agreement, NaNs.

    python -m export.parity --model DIR [--reference SRC] [--cases 200] [--seed 0]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from export.session import open_session, resolve_providers
from model.artifact import KV_KINDS, LOGITS_TO_KEEP, NP_DTYPES, TOKEN_INPUTS, past_name, read_artifact
from model.errors import CliParser, ModelError, run_cli
from model.gpt import GPT
from model.load import load_model

# Bounds on max |logits diff| vs the fp32 PyTorch reference, and the least top-1 agreement.
# fp32: absolute. fp16: FP16_MAX_ABS_DIFF + FP16_REL_DIFF * max |reference logit| (fp16 keeps ~3 digits,
# so trained models whose logits reach ~100 get a proportionally wider bound).
FP32_MAX_ABS_DIFF = 1e-4
FP16_MAX_ABS_DIFF = 5e-2
FP16_REL_DIFF = 5e-3
MIN_TOP1_AGREEMENT = {"float32": 0.999, "float16": 0.98}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """The reference's small forwards run many times faster on one thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def max_abs_bound(dtype: str, ref_absmax: float = 0.0) -> float:
    return FP32_MAX_ABS_DIFF if dtype == "float32" else FP16_MAX_ABS_DIFF + FP16_REL_DIFF * ref_absmax


def left_padded_batch(rng: np.random.Generator, batch: int, length: int, n_vocab: int,
                      pads: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids [batch, length]; row r has pads[r] left pads."""
    ids = torch.from_numpy(rng.integers(0, n_vocab, (batch, length), dtype=np.int64))
    mask = torch.ones(batch, length, dtype=torch.int64)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
        ids[r, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.inference_mode()
def verify_decode(model: GPT, backend: Any, n_vocab: int, *, steps: int = 8, prompt_len: int = 12,
                  seed: int = 0) -> dict[str, Any]:
    """backend: anything with max_seq_len, reset, prefill and decode_one_token (the Backend protocol's calls).
    Left-padded batch of 2: prefill + `steps` decode steps on both; the reference's greedy token is
    fed to both. Returns max |diff| over all steps, whether every greedy token agreed, and how many
    disagreements were near ties (reference gap <= 2 * max |diff|) or not (greedy_unexplained)."""
    rng = np.random.default_rng(seed)
    prompt_len = max(2, min(prompt_len, backend.max_seq_len - steps))
    ids, mask, pos = left_padded_batch(rng, 2, prompt_len, n_vocab, [0, prompt_len // 3])
    backend.reset(2, prompt_len + steps)
    ref, past = model(ids, attention_mask=mask, position_ids=pos, last_logits_only=True)
    ref = ref[:, -1]
    got = backend.prefill(ids, mask, pos).float().cpu()
    diffs, agree, ref_absmax, near_ties, unexplained = [], [], 0.0, 0, 0
    for step in range(steps + 1):
        diffs.append((got - ref).abs().max().item())
        ref_absmax = max(ref_absmax, ref.abs().max().item())
        ref_tok = ref[:, :n_vocab].argmax(-1, keepdim=True)
        got_tok = got[:, :n_vocab].argmax(-1, keepdim=True)
        agree.append(bool((got_tok == ref_tok).all()))
        # A different argmax is a near tie when the reference's own gap between the two tokens is within
        # twice this step's max |diff|: any implementation within that error could pick either.
        gap = ref.gather(1, ref_tok) - ref.gather(1, got_tok)
        differs = got_tok != ref_tok
        near_ties += int((differs & (gap <= 2 * diffs[-1])).sum())
        unexplained += int((differs & (gap > 2 * diffs[-1])).sum())
        if step == steps:
            break
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        ref, past = model(ref_tok, past, attention_mask=mask, position_ids=pos, last_logits_only=True)
        ref = ref[:, -1]
        got = backend.decode_one_token(ref_tok, mask, pos).float().cpu()
    return {"steps": steps, "max_abs_diff": max(diffs), "greedy_identical": all(agree), "near_ties": near_ties,
            "greedy_unexplained": unexplained, "nan": int(sum(np.isnan(d) for d in diffs)),
            "ref_absmax": ref_absmax}


@torch.inference_mode()
def parity_report(model: GPT, artifact_dir: str | os.PathLike, *, cases: int = 200, seed: int = 0,
                  max_batch: int = 4, max_past: int = 24, max_new: int = 8, n_vocab: int | None = None,
                  providers: list[str] | None = None, session: Any = None) -> dict[str, Any]:
    """Run many random cases straight on the ONNX session (past of any length, several new tokens).
    session: an open onnxruntime InferenceSession of this artifact to reuse (default: open one)."""
    art = read_artifact(artifact_dir, verify=False)
    c, dtype = art.config, art.spec.dtype
    n_vocab = n_vocab or art.tokenizer.n_vocab
    all_logits = art.spec.logits == "all"
    limit = art.spec.max_seq_len
    if session is None:
        session = open_session(art.model_path, c, resolve_providers(providers))
    rng = np.random.default_rng(seed)
    case_max, present_max, agree, rows, nans, ref_absmax = [], [], 0, 0, 0, 0.0
    for _ in range(cases):
        B = int(rng.integers(1, max_batch + 1))
        S = int(rng.integers(1, min(max_new, limit) + 1))
        P = int(rng.integers(0, max(1, min(max_past, limit - S) + 1)))
        if art.spec.inplace_kv and B > 1 and P:  # GroupQueryAttention: several new tokens over a past at batch 1 only
            S = 1
        pads = [int(rng.integers(0, P + S)) if rng.random() < 0.5 else 0 for _ in range(B)]
        ids, mask, pos = left_padded_batch(rng, B, P + S, n_vocab, pads)
        if P:
            _, past = model(ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P])
        else:
            past = model.empty_past(B)
        ref, present = model(ids[:, P:], past, attention_mask=mask, position_ids=pos[:, P:],
                             last_logits_only=not all_logits)
        feed = dict(zip(TOKEN_INPUTS, (ids[:, P:].numpy(), mask.numpy(), pos[:, P:].numpy())))
        if art.spec.takes_logits_to_keep:
            feed[LOGITS_TO_KEEP] = np.array([1], np.int64)
        for i, kv in enumerate(past):
            for kind, t in zip(KV_KINDS, kv):
                if art.spec.inplace_kv:  # a buffer of capacity P + S holding the past in its first P positions
                    t = torch.cat([t, torch.zeros(B, c.n_head, S, c.head_dim)], dim=2)
                feed[past_name(i, kind)] = t.numpy().astype(NP_DTYPES[dtype])
        out = session.run(None, feed)
        got, ref = torch.from_numpy(out[0])[:, -1].float(), ref[:, -1]
        nans += int((~torch.isfinite(got)).sum())
        case_max.append((got - ref).abs().max().item())
        ref_absmax = max(ref_absmax, ref.abs().max().item())
        present_max.append(max(np.abs(out[1 + 2 * i + j].astype(np.float32) - present[i][j].numpy()).max()
                               for i in range(c.n_layer) for j in range(2)))
        agree += int((got[:, :n_vocab].argmax(-1) == ref[:, :n_vocab].argmax(-1)).sum())
        rows += B
    d = np.array(case_max)
    return {"cases": cases, "rows": rows, "dtype": dtype, "graph": art.spec.graph,
            "p50": float(np.percentile(d, 50)), "p99": float(np.percentile(d, 99)), "max": float(d.max()),
            "present_max": float(max(present_max)), "top1_agreement": agree / rows, "nan": nans,
            "ref_absmax": ref_absmax, "bound": max_abs_bound(dtype, ref_absmax)}


def format_report(r: dict[str, Any]) -> str:
    return (f"{r['cases']} cases ({r['rows']} rows), {r['graph']} {r['dtype']}: |logits diff| p50 {r['p50']:.2e} "
            f"p99 {r['p99']:.2e} max {r['max']:.2e}; present max {r['present_max']:.2e}; "
            f"top-1 agreement {r['top1_agreement']:.4f}; NaN {r['nan']} (bound {r['bound']:.1e}, "
            f"max |ref logit| {r['ref_absmax']:.1f})")


def report_ok(r: dict[str, Any]) -> bool:
    return r["nan"] == 0 and r["max"] <= r["bound"] and r["top1_agreement"] >= MIN_TOP1_AGREEMENT[r["dtype"]]


def main(argv: list[str] | None = None) -> int:
    """The statistical parity report of an existing artifact."""
    p = CliParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="the artifact folder to check")
    p.add_argument("--reference", metavar="SRC",
                   help="the fp32 model it was exported from (default: the weights read back from the artifact; "
                        "pass it for float16 artifacts)")
    p.add_argument("--cases", type=int, default=200, help="random cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cases (default: %(default)s)")
    a = p.parse_args(argv)
    if a.cases < 1:
        raise ModelError("--cases must be >= 1")
    model, tok = load_model(a.reference or a.model)
    with torch_threads(1):
        r = parity_report(model, a.model, cases=a.cases, seed=a.seed, n_vocab=tok.n_vocab)
    print(format_report(r))
    if not report_ok(r):
        raise ModelError(f"parity out of bound: max {r['max']:.2e} > {r['bound']:.1e}, top-1 "
                         f"{r['top1_agreement']:.4f} < {MIN_TOP1_AGREEMENT[r['dtype']]} or NaN {r['nan']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
