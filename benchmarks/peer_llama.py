"""llama.cpp as a CPU peer, from what `make peers` built (benchmarks/setup_peers.sh): the same weights written
as a Hugging Face GPT-2 folder (model.load.save_hf_folder), converted to an f32 GGUF by the vendored llama.cpp's
convert_hf_to_gguf.py, quantized by its llama-quantize (Q4_0, Q8_0), then run through llama-cpp-python's
low-level API (the libllama of that same build) with the loop our rows use: one llama_decode for the prompt,
then one per step for every row, greedy = argmax of the logits in numpy.

Batch B runs as B sequences of one context (n_seq_max = B, a KV stream per sequence, as llama.cpp's own
parallel decoding does); the prompt tokens of all rows go in one batch, the logits of each row's last one out.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers import PeerUnavailable
from benchmarks.stats import Timed
from model.errors import CliParser, ModelError, run_cli
from model.load import load_model, save_hf_folder

ROOT = Path(__file__).resolve().parent.parent
PEERS_ENV = "GPTDEPLOY_PEERS_DIR"  # where `make peers` put the llama.cpp source and build (default: .peers)
LIB_ENV = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python's own variable: the folder of the libllama it loads
QUANT_TYPES = {"f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0"}  # row suffix -> llama-quantize type
CTX_ALIGN = 256  # llama.cpp pads context sizes to this


def peers_dir() -> Path:
    return Path(os.environ.get(PEERS_ENV) or ROOT / ".peers")


def llama_tools() -> tuple[Path, Path]:
    """-> (convert_hf_to_gguf.py, folder of libllama, llama-quantize and llama-bench) of `make peers`' build;
    llama_cpp is imported here, bound to that libllama."""
    bin_dir = peers_dir() / "llama-build" / "bin"
    os.environ[LIB_ENV] = str(bin_dir)  # read by llama_cpp at import: the bindings load this build's libllama
    try:
        import llama_cpp
    except ImportError:
        raise PeerUnavailable("llama-cpp-python is not installed (make peers)") from None
    except (OSError, RuntimeError) as e:  # the bindings without a libllama to load
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise PeerUnavailable(f"llama-cpp-python found no libllama in {bin_dir} ({first}; make peers)") from None
    src = peers_dir() / "src" / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp"
    converter = src / "convert_hf_to_gguf.py"
    if not converter.is_file() or not (bin_dir / "llama-quantize").is_file():
        raise PeerUnavailable(f"llama.cpp {llama_cpp.__version__}'s converter and tools are not in {peers_dir()} "
                              f"(make peers, or set {PEERS_ENV})")
    return converter, bin_dir


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise RuntimeError(f"{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name} failed: {tail}")


def to_gguf(model_src: str, qtype: str, workdir: Path) -> Path:
    """Our weights -> WORKDIR/llama-{qtype}.gguf (the f32 GGUF is written once per workdir and reused)."""
    converter, bin_dir = llama_tools()
    out = workdir / f"llama-{qtype}.gguf"
    f32 = workdir / "llama-f32.gguf"
    if not f32.is_file():
        model, tok = load_model(model_src)  # (an erf-GELU model runs with llama.cpp's GPT-2 tanh GELU: see info)
        hf = workdir / "llama-hf"
        try:
            save_hf_folder(model, tok, hf)
        except ModelError as e:
            raise PeerUnavailable(f"llama.cpp's converter reads a Hugging Face GPT-2 folder: {e}") from None
        del model
        tmp = f32.with_name(f32.name + ".tmp")
        _run([sys.executable, str(converter), str(hf), "--outtype", "f32", "--outfile", str(tmp)])
        os.replace(tmp, f32)
    if qtype != "f32" and not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        _run([str(bin_dir / "llama-quantize"), str(f32), str(tmp), QUANT_TYPES[qtype]])
        os.replace(tmp, out)
    return out


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR (5, CONT, continues lines of every level)
        sys.stderr.write(text.decode(errors="replace"))


class LlamaCpp:
    """A loaded GGUF and one context for B rows of per_seq positions each, remade (before the clock starts) when
    a call needs other rows or more positions: the KV cache is as large as the workload, not the model's context."""

    def __init__(self, gguf: Path, threads: int | None) -> None:
        llama_tools()  # binds llama_cpp to the build's libllama
        import llama_cpp as L

        self.L = L
        L.llama_log_set(_quiet, None)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.threads = threads or os.cpu_count() or 1
        self.ctx, self.batch, self.rows, self.per_seq = None, None, 0, 0

    def context(self, rows: int, positions: int) -> Any:
        L = self.L
        if rows != self.rows or positions > self.per_seq:
            self.close()
            self.per_seq = -(-positions // CTX_ALIGN) * CTX_ALIGN
            p = L.llama_context_default_params()
            p.n_seq_max, p.n_ctx, p.n_batch = rows, rows * self.per_seq, rows * self.per_seq
            p.n_threads = p.n_threads_batch = self.threads
            p.kv_unified = False  # one KV stream per sequence: a row attends over its own positions only
            p.no_perf = True
            self.ctx = L.llama_init_from_model(self.model, p)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {rows} x {self.per_seq} positions")
            self.batch = L.llama_batch_init(rows * self.per_seq, 0, rows)
            self.rows = rows
        return self.ctx

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
        self.ctx, self.batch, self.rows, self.per_seq = None, None, 0, 0

    def _decode(self, n: int, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, out: np.ndarray) -> np.ndarray:
        """One llama_decode of n tokens -> argmax of the logits of the rows flagged in out (in order)."""
        b = self.batch
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, (n,))[:] = tokens
        np.ctypeslib.as_array(b.pos, (n,))[:] = pos
        np.ctypeslib.as_array(b.n_seq_id, (n,))[:] = 1
        np.ctypeslib.as_array(b.logits, (n,))[:] = out
        for i, s in enumerate(seq.tolist()):
            b.seq_id[i][0] = s
        rc = self.L.llama_decode(self.ctx, b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), (int(out.sum()), self.n_vocab))
        return logits.argmax(axis=1)

    def generate(self, prompt: Any, new_tokens: int) -> Timed:
        prompt = np.asarray(prompt, dtype=np.int32)
        B, P = prompt.shape
        self.L.llama_memory_clear(self.L.llama_get_memory(self.context(B, P + new_tokens)), True)
        rows = np.arange(B, dtype=np.int32)
        last = np.zeros((B, P), np.int8)
        last[:, -1] = 1
        tokens = np.empty((B, new_tokens), np.int64)
        t0 = time.perf_counter()
        tokens[:, 0] = self._decode(B * P, prompt.ravel(), np.tile(np.arange(P, dtype=np.int32), B),
                                    np.repeat(rows, P), last.ravel())
        t1 = time.perf_counter()
        every = np.ones(B, np.int8)
        for step in range(1, new_tokens):
            tokens[:, step] = self._decode(B, tokens[:, step - 1], np.full(B, P + step - 1, np.int32), rows, every)
        t2 = time.perf_counter()
        return Timed(t1 - t0, (new_tokens - 1) * B, t2 - t1, tokens[0].tolist())


def open_llama(model_src: str, qtype: str, threads: int | None, workdir: Path) -> LlamaCpp:
    return LlamaCpp(to_gguf(model_src, qtype, workdir), threads)


def run_llama(llm: LlamaCpp, prompt: Any, new_tokens: int) -> Timed:
    return llm.generate(prompt, new_tokens)


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.peer_llama --model SRC --out DIR [--type q4_0]: the GGUF files a llama-* row runs,
    kept (for llama-bench / llama-batched-bench from the same build)."""
    p = CliParser(prog="python -m benchmarks.peer_llama", description=main.__doc__)
    p.add_argument("--model", required=True, help="any source model.load accepts (GPT-2 BPE vocabulary)")
    p.add_argument("--out", type=Path, required=True, help="folder for llama-f32.gguf and llama-TYPE.gguf")
    p.add_argument("--type", choices=sorted(QUANT_TYPES), default="q4_0", help="default: %(default)s")
    a = p.parse_args(argv)
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        print(to_gguf(a.model, a.type, a.out))
    except (PeerUnavailable, RuntimeError, OSError) as e:
        raise ModelError(str(e)) from None
    return 0


if __name__ == "__main__":
    run_cli(main)
