"""Tokenizers: GPT-2 BPE (tiktoken, from vendored files) and nanoGPT-style char vocabularies.

A tokenizer is described by a small JSON-able spec ({"type": "gpt2"} or {"type": "char",
"chars": [...]}) that export writes into the artifact and the runtime reads back.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from model.errors import ModelError

BPE_DIR = Path(__file__).parent / "assets" / "gpt2-bpe"
BPE_SHA256 = {  # the hashes tiktoken itself checks for these files
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOT = 50256


@dataclass
class Tokenizer:
    spec: dict[str, Any]
    n_vocab: int  # ids >= n_vocab are never produced (nanoGPT pads the embedding to 50304)
    eot_token: int | None
    encode: Callable[[str], list[int]] = field(repr=False)
    decode: Callable[[list[int]], str] = field(repr=False)
    encoding: tiktoken.Encoding | None = field(default=None, repr=False)  # GPT-2's (structured output needs it)


def gpt2_tokenizer(bpe_dir: Path = BPE_DIR) -> Tokenizer:
    """GPT-2 BPE built offline from encoder.json + vocab.bpe in bpe_dir (hashes verified)."""
    for name, want in BPE_SHA256.items():
        path = bpe_dir / name
        if not path.is_file():
            raise ModelError(f"{path}: GPT-2 BPE file missing")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            raise ModelError(f"{path}: sha256 {got} does not match the GPT-2 file ({want})")
    ranks = data_gym_to_mergeable_bpe_ranks(str(bpe_dir / "vocab.bpe"), str(bpe_dir / "encoder.json"))
    enc = tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )
    return Tokenizer(
        spec={"type": "gpt2"}, n_vocab=enc.n_vocab, eot_token=GPT2_EOT,
        encode=lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}),
        decode=enc.decode, encoding=enc,
    )


def char_tokenizer(chars: list[str]) -> Tokenizer:
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(s: str) -> list[int]:
        for c in s:
            if c not in stoi:
                raise ModelError(f"character {c!r} is not in the model's {len(chars)}-character vocabulary")
        return [stoi[c] for c in s]

    return Tokenizer(spec={"type": "char", "chars": list(chars)}, n_vocab=len(chars),
                     eot_token=None, encode=encode, decode=lambda ids: "".join(chars[i] for i in ids))


def tokenizer_from_spec(spec: dict[str, Any], base_dir: Path | None = None) -> Tokenizer:
    """base_dir: a folder (e.g. an export artifact) that may carry its own encoder.json/vocab.bpe."""
    if spec.get("type") == "gpt2":
        if base_dir is not None and all((base_dir / n).is_file() for n in BPE_SHA256):
            return gpt2_tokenizer(base_dir)
        return gpt2_tokenizer()
    if spec.get("type") == "char" and isinstance(spec.get("chars"), list):
        return char_tokenizer(spec["chars"])
    raise ModelError(f"unknown tokenizer spec {str(spec)[:80]!r}")


def load_char_vocab_json(path: Path) -> Tokenizer:
    try:
        return tokenizer_from_spec(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read char vocabulary ({e})") from None


class _PlainDataUnpickler(pickle.Unpickler):
    """Admits only built-in containers and scalars: any class or function reference
    (the way pickles run code) is refused before it is resolved."""

    def find_class(self, module: str, name: str) -> Any:
        raise ModelError(f"refusing to load {module}.{name}: meta.pkl may hold only plain data")


def load_meta_pkl(path: Path) -> Tokenizer:
    """nanoGPT's meta.pkl: {'vocab_size': N, 'itos': {i: ch}, 'stoi': {ch: i}}."""
    try:
        with open(path, "rb") as f:
            meta = _PlainDataUnpickler(f).load()
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ModelError(f"{path}: not a readable meta.pkl ({e})") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or not all(isinstance(k, int) and isinstance(v, str)
                                             for k, v in itos.items()):
        raise ModelError(f"{path}: meta.pkl has no int->str 'itos' table")
    if sorted(itos) != list(range(len(itos))):
        raise ModelError(f"{path}: meta.pkl 'itos' ids are not 0..{len(itos) - 1}")
    return char_tokenizer([itos[i] for i in range(len(itos))])
