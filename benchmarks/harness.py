"""lm-evaluation-harness against `runtime.serve`: small local tasks scored through the completions endpoint,
and the same numbers computed directly from the model.

    python -m benchmarks.harness                                   # the trained demo model, torch backend
    python -m benchmarks.harness --model DIR --backend onnxruntime # an artifact (echo needs every position's
                                                                   # logits: the ort graph or --all-logits)

1. Two tasks of lm-evaluation-harness's own YAML format (local json data, no hub access), built from the
   held-out tinyshakespeare text (model/assets/tinyshakespeare-val.txt, never trained on):
   - next_line (multiple_choice): two lines of context, which of 4 lines of the same text comes next
     (acc, acc_norm); lm-eval scores each choice by its log-likelihood, which it asks the server for as
     `echo: true, logprobs: 1, max_tokens: 1` over token ids;
   - continue (generate_until "\\n", greedy, max_gen_toks): the model's own next line (exact_match).
2. The server on a free loopback port; `lm_eval.simple_evaluate` with its `local-completions` model, which
   finds our /tokenize endpoints and tokenizes on the server (no tokenizer files of its own), every
   sample logged.
3. The same directly, without HTTP or lm-eval: each choice's log-likelihood from one forward of context +
   choice (log_softmax of the backend's fp32 logits, summed over the choice's tokens), each greedy
   continuation from runtime.loop.generate.
4. Compared: every choice's log-likelihood within LOGLIK_TOL, the same argmax, greedy text identical, so
   lm-eval's acc / acc_norm / exact_match equal ours. Writes OUT/harness.json and OUT/harness.md; exit 1 if
   any comparison fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine_info
from benchmarks.serve import ServerProcess
from model.errors import CliParser, ModelError, require_extra, run_cli
from model.files import write_atomic
from runtime.loop import SamplingParams, generate, window_inputs
from runtime.open_backend import open_backend

ROOT = Path(__file__).resolve().parent.parent
VAL_TEXT = ROOT / "model" / "assets" / "tinyshakespeare-val.txt"
DEFAULT_OUT = ROOT / "out" / "harness"
LOGLIK_TOL = 1e-4  # fp32 log-likelihood of a whole choice (a sum over its tokens)
CONTEXT_LINES, CHOICES, MAX_GEN_TOKS = 2, 4, 32
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


def make_docs(n: int, seed: int, limit: int) -> list[dict[str, Any]]:
    """n documents: CONTEXT_LINES lines of context, the true next line among CHOICES lines of the text; each
    context + choice, and context + MAX_GEN_TOKS, within `limit` characters (a character is at least a token),
    so that neither lm-eval nor the server truncates anything."""
    lines = VAL_TEXT.read_text().split("\n")
    spoken = sorted({ln for ln in lines if ln.strip()})
    rng = random.Random(seed)
    docs = []
    # the context ends in a spoken line without trailing space: lm-eval moves trailing whitespace of a context into
    # the continuation, so there is none to move and both sides score the same strings
    starts = [i for i in range(len(lines) - CONTEXT_LINES) if lines[i + CONTEXT_LINES].strip()
              and lines[i + CONTEXT_LINES - 1].strip() == lines[i + CONTEXT_LINES - 1].rstrip() != ""]
    rng.shuffle(starts)
    for start in starts:
        if len(docs) == n:
            break
        context = "\n".join(lines[start:start + CONTEXT_LINES])
        true = lines[start + CONTEXT_LINES]
        others = rng.sample([ln for ln in spoken if ln != true], CHOICES - 1)
        if len(context) + max(len(c) for c in [true, *others]) + 2 > limit or len(context) + 1 + MAX_GEN_TOKS > limit:
            continue
        label = rng.randrange(CHOICES)
        choices = others[:label] + [true] + others[label:]
        docs.append({"context": context, "choices": ["\n" + c for c in choices], "label": label,
                     "prompt": context + "\n", "target": true})
    return docs


def write_tasks(folder: Path, docs: list[dict[str, Any]]) -> list[str]:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "next_line.yaml").write_text(TASK.format(name="gptdeploy_next_line", data=data) + """\
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (folder / "continue.yaml").write_text(TASK.format(name="gptdeploy_continue", data=data) + f"""\
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  temperature: 0
  max_gen_toks: {MAX_GEN_TOKS}
metric_list:
  - metric: exact_match
""")
    return ["gptdeploy_next_line", "gptdeploy_continue"]


def run_lm_eval(url: str, tasks: list[str], folder: Path, limit: int) -> dict[str, Any]:
    # the eval extra: imported once main has checked it is installed
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": url + "/v1/completions", "model": "served", "num_concurrent": 4,
                    "max_retries": 1, "tokenized_requests": True, "max_length": limit},
        tasks=tasks, task_manager=TaskManager(include_path=str(folder)), log_samples=True, batch_size=1)


def direct_logliks(backend: Any, docs: list[dict[str, Any]]) -> list[list[float]]:
    """Each choice's log-likelihood given the context: one forward of context + choice, fp32 log_softmax."""
    tok, out = backend.tokenizer, []
    for d in docs:
        context = tok.encode(d["context"])
        seqs = [context + tok.encode(d["context"] + c)[len(context):] for c in d["choices"]]
        ids, mask, pos = window_inputs(seqs, backend.max_seq_len)
        backend.reset(len(seqs), ids.shape[1])
        logits, _ = backend.prefill_rows(ids.to(backend.device), mask.to(backend.device), pos.to(backend.device),
                                         all_logits=True)
        logp = torch.log_softmax(logits.float().cpu(), -1)
        row = []
        for i, s in enumerate(seqs):
            pad = ids.shape[1] - len(s)
            row.append(sum(float(logp[i, pad + j - 1, s[j]]) for j in range(len(context), len(s))))
        out.append(row)
    return out


def direct_continuations(backend: Any, docs: list[dict[str, Any]]) -> list[str]:
    tok, out = backend.tokenizer, []
    for d in docs:
        r = generate(backend, [tok.encode(d["prompt"])], SamplingParams(max_new_tokens=MAX_GEN_TOKS, greedy=True,
                                                                         stop=["\n"]))
        out.append(r.texts[0])
    return out


def compare(results: dict[str, Any], docs: list[dict[str, Any]], logliks: list[list[float]],
            continuations: list[str]) -> dict[str, Any]:
    samples = results["samples"]
    served = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples["gptdeploy_next_line"]}
    diffs = [abs(a - b) for i, row in enumerate(logliks) for a, b in zip(served[i], row)]
    argmax_same = sum(max(range(CHOICES), key=served[i].__getitem__) == max(range(CHOICES), key=row.__getitem__)
                      for i, row in enumerate(logliks))
    generated = {s["doc_id"]: s["filtered_resps"][0] for s in samples["gptdeploy_continue"]}
    same_text = sum(generated[i] == c for i, c in enumerate(continuations))
    n = len(docs)
    acc = sum(max(range(CHOICES), key=row.__getitem__) == d["label"] for row, d in zip(logliks, docs)) / n
    acc_norm = sum(max(range(CHOICES), key=lambda k: row[k] / len(d["choices"][k].encode())) == d["label"]
                   for row, d in zip(logliks, docs)) / n
    exact = sum(c == d["target"] for c, d in zip(continuations, docs)) / n
    metrics = results["results"]
    return {"docs": n, "choices_scored": len(diffs), "max_abs_loglik_diff": max(diffs),
            "mean_abs_loglik_diff": sum(diffs) / len(diffs), "argmax_same": argmax_same,
            "greedy_text_same": same_text,
            "lm_eval": {"acc": metrics["gptdeploy_next_line"]["acc,none"],
                        "acc_norm": metrics["gptdeploy_next_line"]["acc_norm,none"],
                        "exact_match": metrics["gptdeploy_continue"]["exact_match,none"]},
            "direct": {"acc": acc, "acc_norm": acc_norm, "exact_match": exact}}


def markdown(doc: dict[str, Any]) -> str:
    c, m = doc["comparison"], doc["machine"]
    ok = lambda b: "equal" if b else "DIFFERENT"  # noqa: E731
    rows = [f"| {k} | {c['lm_eval'][k]:.4f} | {c['direct'][k]:.4f} | "
            f"{ok(math.isclose(c['lm_eval'][k], c['direct'][k], abs_tol=1e-9))} |" for k in c["direct"]]
    return "\n".join([
        f"{doc['started']} · {m.get('cpu')} · lm-eval {doc['lm_eval_version']} · commit {m.get('git_commit')}",
        "",
        f"Model {doc['model']} on `runtime.serve --backend {doc['backend']}`, lm-eval's `local-completions` "
        f"(tokenizer: the server's /tokenize), {c['docs']} held-out tinyshakespeare documents.",
        "",
        "| metric | lm-eval through the server | direct (no HTTP, no lm-eval) | |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Per choice: {c['choices_scored']} log-likelihoods, max |diff| {c['max_abs_loglik_diff']:.2e} "
        f"(bound {LOGLIK_TOL:g}), mean {c['mean_abs_loglik_diff']:.2e}; same argmax in {c['argmax_same']} of "
        f"{c['docs']} documents; greedy continuation identical in {c['greedy_text_same']} of {c['docs']}.",
    ]) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m benchmarks.harness", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="what runtime.serve's --model takes (default: %(default)s)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"), help="(default: %(default)s)")
    p.add_argument("--docs", type=int, default=40, help="documents per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which lines the documents take (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: out/harness)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    require_extra("eval", "lm_eval")
    if a.docs < 1:
        raise ModelError(f"--docs must be >= 1, got {a.docs}")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # local json data: nothing to fetch
        os.environ.setdefault(name, "1")
    import lm_eval  # the eval extra, after the offline switches above (datasets reads them at import)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    backend = open_backend(a.backend, a.model, threads=1)
    docs = make_docs(a.docs, a.seed, backend.max_seq_len)
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        tasks = write_tasks(Path(tmp), docs)
        with ServerProcess(["--model", a.model, "--backend", a.backend, "--threads", "1", "--max-batch", "4",
                           "--served-model-name", "served"]) as s:
            results = run_lm_eval(s.url, tasks, Path(tmp), backend.max_seq_len)
    comparison = compare(results, docs, direct_logliks(backend, docs), direct_continuations(backend, docs))
    doc = {"started": started, "model": a.model, "backend": a.backend, "lm_eval_version": lm_eval.__version__,
           "machine": machine_info(), "loglik_tol": LOGLIK_TOL, "comparison": comparison}
    text = markdown(doc)
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "harness.json", json.dumps(doc, indent=1).encode())
    write_atomic(a.out / "harness.md", text.encode())
    print(text)
    c = comparison
    same = c["max_abs_loglik_diff"] <= LOGLIK_TOL and c["argmax_same"] == c["docs"] == c["greedy_text_same"]
    return 0 if same and c["lm_eval"] == c["direct"] else 1


if __name__ == "__main__":
    run_cli(main)
