"""Quality of a reduced-precision artifact (fp16, int8, int4) against the fp32 PyTorch model, on real text.

A quantized graph cannot be token-identical to fp32, so it is judged on held-out text instead: every
position of `seqs` windows of the held-out tinyshakespeare split (model/assets/tinyshakespeare-val.txt,
the last 10% of the corpus, never trained on) is scored teacher-forced through the artifact's backend
(prefill one token, then one decode step per token: the KV-cache path generation runs; the export drives its
graph with export/session.ArtifactSession, any runtime backend works too):

- val loss: mean cross-entropy of the next token, nats/token, artifact vs the fp32 reference;
- top-1 agreement: share of positions where the artifact's argmax equals the fp32 argmax;
- KL(fp32 || artifact): mean over positions of the divergence of the next-token distributions.

Only ids below the tokenizer's n_vocab count (nanoGPT's padded rows are never sampled).
Bounds (QUALITY_BOUNDS) fail the export's verify step: int8 val loss <= fp32 + 0.01 and top-1 >= 0.97;
int4 val loss <= fp32 + 0.05 and top-1 >= 0.90. fp16 is reported (its parity bounds are export/parity.py's).

    python -m export.quality --model DIR --reference SRC [--seqs 64] [--seq-len 128] [--text FILE] [--threads N]
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export.parity import torch_threads
from export.session import ArtifactSession
from model.artifact import read_artifact
from model.errors import CliParser, ModelError, run_cli
from model.load import load_model

VAL_TEXT = Path(__file__).resolve().parent.parent / "model" / "assets" / "tinyshakespeare-val.txt"
VAL_SHA256 = "c54f3753a4e6e3c3d1759212815a7caf826e68a33021b25312984400bed40a1f"
QUALITY_BOUNDS = {"int8": {"max_loss_increase": 0.01, "min_top1": 0.97},
                  "int4": {"max_loss_increase": 0.05, "min_top1": 0.90}}
DEFAULT_SEQS, DEFAULT_SEQ_LEN = 32, 128


def eval_windows(tokenizer: Any, seqs: int, seq_len: int, text_path: Path | None = None) -> torch.Tensor:
    """[seqs, seq_len] token ids: evenly spaced windows of the held-out text (the same ones every run)."""
    path = Path(text_path) if text_path is not None else VAL_TEXT
    if not path.is_file():
        raise ModelError(f"{path}: evaluation text not found")
    raw = path.read_bytes()
    if text_path is None and hashlib.sha256(raw).hexdigest() != VAL_SHA256:
        raise ModelError(f"{path}: sha256 does not match the held-out tinyshakespeare split")
    try:
        ids = tokenizer.encode(raw.decode("utf-8"))
    except (KeyError, ValueError) as e:
        raise ModelError(f"{path}: the model's tokenizer cannot encode this text ({e})") from None
    if len(ids) < seq_len + seqs:
        raise ModelError(f"{path}: {len(ids)} tokens is too short for {seqs} windows of {seq_len}")
    starts = np.linspace(0, len(ids) - seq_len, seqs).astype(int)
    data = torch.tensor(ids, dtype=torch.long)
    return torch.stack([data[s:s + seq_len] for s in starts])


@torch.inference_mode()
def backend_logits(backend: Any, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """Teacher-forced next-token logits from a runtime backend: [N, L - 1, vocab] (float32, CPU)."""
    N, L = tokens.shape
    out = []
    for r in range(0, N, batch):
        rows = tokens[r:r + batch]
        B = rows.shape[0]
        mask = torch.ones(B, L - 1, dtype=torch.long)
        backend.reset(B, L - 1)
        steps = [backend.prefill(rows[:, :1], mask[:, :1], torch.zeros(B, 1, dtype=torch.long)).float().cpu()]
        for t in range(1, L - 1):
            pos = torch.full((B, 1), t, dtype=torch.long)
            steps.append(backend.decode_one_token(rows[:, t:t + 1], mask[:, :t + 1], pos).float().cpu())
        out.append(torch.stack(steps, dim=1))
    return torch.cat(out)


@torch.inference_mode()
def reference_logits(model: Any, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(tokens[r:r + batch, :-1])[0].float() for r in range(0, tokens.shape[0], batch)])


def compare(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor, n_vocab: int) -> dict[str, float]:
    """ref/got logits [N, T, V], targets [N, T] -> val losses, top-1 agreement, KL(ref || got)."""
    ref_lp = F.log_softmax(ref[..., :n_vocab].double(), dim=-1)
    got_lp = F.log_softmax(got[..., :n_vocab].double(), dim=-1)
    loss_ref = -ref_lp.gather(-1, targets[..., None]).mean().item()
    loss_got = -got_lp.gather(-1, targets[..., None]).mean().item()
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1)
    top1 = (ref_lp.argmax(-1) == got_lp.argmax(-1)).double().mean().item()
    return {"tokens": int(targets.numel()), "val_loss_fp32": loss_ref, "val_loss": loss_got,
            "loss_increase": loss_got - loss_ref, "top1_agreement": top1, "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(), "nan": int((~torch.isfinite(got)).sum())}


def quality_report(model: Any, backend: Any, tokenizer: Any, *, seqs: int = DEFAULT_SEQS,
                   seq_len: int = DEFAULT_SEQ_LEN, batch: int = 16, text_path: Path | None = None) -> dict[str, Any]:
    """The fp32 reference `model` vs the artifact run by `backend` on held-out text."""
    seq_len = min(seq_len, backend.max_seq_len + 1, model.config.block_size)
    tokens = eval_windows(tokenizer, seqs, seq_len, text_path)
    ref = reference_logits(model, tokens, batch)
    got = backend_logits(backend, tokens, batch)
    r = compare(ref, got, tokens[:, 1:], tokenizer.n_vocab)
    r.update(seqs=seqs, seq_len=seq_len, text=str(text_path or VAL_TEXT.name))
    return r


def check_bounds(r: dict[str, Any], precision: str) -> list[str]:
    """The problems that fail verification (empty when within bounds or when no bound applies)."""
    problems = [f"{r['nan']} non-finite logits"] if r["nan"] else []
    bound = QUALITY_BOUNDS.get(precision)
    if bound is None:
        return problems
    if not r["loss_increase"] <= bound["max_loss_increase"]:
        problems.append(f"val loss {r['val_loss']:.4f} > fp32 {r['val_loss_fp32']:.4f} + {bound['max_loss_increase']}")
    if not r["top1_agreement"] >= bound["min_top1"]:
        problems.append(f"top-1 agreement {r['top1_agreement']:.4f} < {bound['min_top1']}")
    return problems


def format_quality(r: dict[str, Any], precision: str) -> str:
    bound = QUALITY_BOUNDS.get(precision)
    rule = (f"bound for {precision}: val loss <= fp32 + {bound['max_loss_increase']}, top-1 >= {bound['min_top1']}"
            if bound else f"no quality bound for {precision}, reported only")
    return (f"held-out text, {r['tokens']} tokens ({r['seqs']} x {r['seq_len'] - 1}): val loss {r['val_loss']:.4f} "
            f"vs fp32 {r['val_loss_fp32']:.4f} ({r['loss_increase']:+.4f} nats/token), top-1 agreement "
            f"{r['top1_agreement']:.4f}, KL(fp32 || {precision}) mean {r['kl_mean']:.2e} max {r['kl_max']:.2e} "
            f"({rule})")


def main(argv: list[str] | None = None) -> int:
    """The quality report of an existing artifact against the fp32 model it was exported from."""
    p = CliParser(prog="python -m export.quality", description=main.__doc__)
    p.add_argument("--model", required=True, metavar="DIR", help="the artifact folder to judge")
    p.add_argument("--reference", required=True, metavar="SRC", help="the fp32 model it was exported from")
    p.add_argument("--seqs", type=int, default=64, help="held-out windows (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per window (default: %(default)s)")
    p.add_argument("--text", type=Path, help="held-out text (default: model/assets/tinyshakespeare-val.txt)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: their own choice)")
    a = p.parse_args(argv)
    if a.seqs < 1 or a.seq_len < 2:
        raise ModelError("--seqs must be >= 1 and --seq-len >= 2")
    model, tok = load_model(a.reference)
    precision = read_artifact(a.model, verify=False).spec.precision
    session = ArtifactSession(a.model, threads=a.threads)
    with torch_threads(a.threads or torch.get_num_threads()):
        r = quality_report(model, session, tok, seqs=a.seqs, seq_len=a.seq_len, text_path=a.text)
    print(f"{a.model} ({precision}): {format_quality(r, precision)}")
    problems = check_bounds(r, precision)
    if problems:
        raise ModelError("quality out of bound: " + "; ".join(problems))
    return 0


if __name__ == "__main__":
    run_cli(main)
