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


def run_lm_eval(model: str, model_args: dict[str, Any], tasks: list[str], folder: Path) -> dict[str, Any]:
    # the eval extra: imported once main has checked it is installed
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, batch_size=1,
                                   task_manager=TaskManager(include_path=str(folder)))


def lm_eval_side(results: dict[str, Any]) -> dict[str, Any]:
    """What lm-eval scored: each choice's log-likelihood, each greedy continuation, the metrics."""
    samples, metrics = results["samples"], results["results"]
    logliks = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples["gptdeploy_next_line"]}
    texts = {s["doc_id"]: s["filtered_resps"][0] for s in samples["gptdeploy_continue"]}
    return {"logliks": [logliks[i] for i in range(len(logliks))], "texts": [texts[i] for i in range(len(texts))],
            "metrics": {"acc": metrics["gptdeploy_next_line"]["acc,none"],
                        "acc_norm": metrics["gptdeploy_next_line"]["acc_norm,none"],
                        "exact_match": metrics["gptdeploy_continue"]["exact_match,none"]}}


def direct_side(backend: Any, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The same without HTTP or lm-eval: each choice's log-likelihood from one forward of context + choice (fp32
    log_softmax), each greedy continuation from runtime.loop.generate, and the metrics as lm-eval defines them."""
    tok, logliks, texts = backend.tokenizer, [], []
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
        logliks.append(row)
        r = generate(backend, [tok.encode(d["prompt"])], SamplingParams(max_new_tokens=MAX_GEN_TOKS, greedy=True,
                                                                         stop=["\n"]))
        texts.append(r.texts[0])
    n = len(docs)

    def best(row: list[float], d: dict[str, Any], norm: bool) -> int:  # acc_norm: per byte of the choice
        return max(range(CHOICES), key=lambda k: row[k] / (len(d["choices"][k].encode()) if norm else 1))

    metrics = {"acc": sum(best(row, d, False) == d["label"] for row, d in zip(logliks, docs)) / n,
               "acc_norm": sum(best(row, d, True) == d["label"] for row, d in zip(logliks, docs)) / n,
               "exact_match": sum(t == d["target"] for t, d in zip(texts, docs)) / n}
    return {"logliks": logliks, "texts": texts, "metrics": metrics}


def hf_reference_folder(model: str, out: Path) -> Path:
    """lm-eval's `hf` model needs tokenizer files beside the weights: a folder of links to the model's files plus
    GPT-2's BPE files as transformers names them (model/assets/gpt2-bpe: encoder.json = vocab.json, vocab.bpe =
    merges.txt)."""
    src = Path(model).resolve()
    if not (src / "config.json").is_file() or json.loads((src / "config.json").read_text()).get("model_type") != "gpt2":
        raise ModelError(f"--hf-reference needs --model to be a Hugging Face GPT-2 folder, got {model}")
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).symlink_to(f)
    bpe = ROOT / "model" / "assets" / "gpt2-bpe"
    for name, target in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        if not (out / name).exists():
            (out / name).symlink_to(bpe / target)
    if not (out / "tokenizer_config.json").exists():
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    diffs = [abs(x - y) for ra, rb in zip(a["logliks"], b["logliks"]) for x, y in zip(ra, rb)]
    argmax = lambda row: max(range(CHOICES), key=row.__getitem__)  # noqa: E731
    return {"choices_scored": len(diffs), "max_abs_loglik_diff": max(diffs),
            "mean_abs_loglik_diff": sum(diffs) / len(diffs),
            "argmax_same": sum(argmax(x) == argmax(y) for x, y in zip(a["logliks"], b["logliks"])),
            "greedy_text_same": sum(x == y for x, y in zip(a["texts"], b["texts"])),
            "metrics_equal": a["metrics"] == b["metrics"]}


def agrees(c: dict[str, Any], docs: int) -> bool:
    return (c["max_abs_loglik_diff"] <= LOGLIK_TOL and c["argmax_same"] == c["greedy_text_same"] == docs
            and c["metrics_equal"])


SIDE_NAMES = {"direct": "direct (no HTTP, no lm-eval)", "transformers": "lm-eval's own `hf` model (transformers)"}


def markdown(doc: dict[str, Any]) -> str:
    m, sides, n = doc["machine"], doc["metrics"], doc["docs"]
    others = [k for k in SIDE_NAMES if k in sides]
    rows = [f"| {k} | {sides['served'][k]:.4f} | " + " | ".join(f"{sides[o][k]:.4f}" for o in others) + " |"
            for k in sides["served"]]
    lines = [
        f"{doc['started']} · {m.get('cpu')} · lm-eval {doc['lm_eval_version']} · commit {m.get('git_commit')}",
        "",
        f"Model {doc['model']} on `runtime.serve --backend {doc['backend']}`, lm-eval's `local-completions` "
        f"(tokenizer: the server's /tokenize), {n} held-out tinyshakespeare documents.",
        "",
        "| metric | lm-eval through the server | " + " | ".join(SIDE_NAMES[o] for o in others) + " |",
        "|---|---|" + "---|" * len(others),
        *rows,
        ""]
    for o in others:
        c = doc["comparisons"][o]
        lines.append(f"Against {SIDE_NAMES[o]}: {c['choices_scored']} log-likelihoods, max |diff| "
                     f"{c['max_abs_loglik_diff']:.2e} (bound {LOGLIK_TOL:g}), mean {c['mean_abs_loglik_diff']:.2e}; "
                     f"same argmax in {c['argmax_same']} of {n} documents; greedy continuation identical in "
                     f"{c['greedy_text_same']} of {n}; metrics {'equal' if c['metrics_equal'] else 'DIFFERENT'}.")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m benchmarks.harness", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="what runtime.serve's --model takes (default: %(default)s)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"), help="(default: %(default)s)")
    p.add_argument("--docs", type=int, default=40, help="documents per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which lines the documents take (default: %(default)s)")
    p.add_argument("--hf-reference", action="store_true",
                   help="also score the tasks with lm-eval's own hf model (transformers) on --model, a Hugging Face "
                        "GPT-2 folder, and compare it with the server too")
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
    sides = {}
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        tasks = write_tasks(Path(tmp), docs)
        with ServerProcess(["--model", a.model, "--backend", a.backend, "--threads", "1", "--max-batch", "4",
                           "--served-model-name", "served"]) as s:
            sides["served"] = lm_eval_side(run_lm_eval(
                "local-completions", {"base_url": s.url + "/v1/completions", "model": "served", "num_concurrent": 4,
                                      "max_retries": 1, "tokenized_requests": True, "max_length": backend.max_seq_len},
                tasks, Path(tmp)))
        if a.hf_reference:
            folder = hf_reference_folder(a.model, Path(tmp) / "hf")
            sides["transformers"] = lm_eval_side(run_lm_eval(
                "hf", {"pretrained": str(folder), "device": "cpu", "dtype": "float32"}, tasks, Path(tmp)))
    sides["direct"] = direct_side(backend, docs)
    comparisons = {k: compare(sides["served"], sides[k]) for k in SIDE_NAMES if k in sides}
    doc = {"started": started, "model": a.model, "backend": a.backend, "lm_eval_version": lm_eval.__version__,
           "machine": machine_info(), "loglik_tol": LOGLIK_TOL, "docs": len(docs),
           "metrics": {k: v["metrics"] for k, v in sides.items()}, "comparisons": comparisons}
    text = markdown(doc)
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "harness.json", json.dumps(doc, indent=1).encode())
    write_atomic(a.out / "harness.md", text.encode())
    print(text)
    return 0 if all(agrees(c, len(docs)) for c in comparisons.values()) else 1


if __name__ == "__main__":
    run_cli(main)
