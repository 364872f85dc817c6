"""Structured output: constrain generation to a JSON schema, any JSON object, a regex or a Lark grammar.

llguidance (the "structured" extra) compiles the grammar against the model's tokenizer and, before each
token, gives the set of tokens that keep the output inside the grammar as a bitmask (computed on the CPU).
`runtime/loop.py`'s sample_next applies it (disallowed logits -> -inf) before greedy or sampling, for
runtime.generate and the server's scheduler alike, and advances each row's matcher with the token chosen.
A row ends with finish reason "stop" once its grammar is complete (nothing more may follow); GPT-2's
end-of-text token is allowed exactly where the grammar may end.

A vocabulary that cannot spell what the grammar needs first (a character-level model without `{` or `"`
for JSON) is refused before any work, with a one-line GenerationError (the server: 400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.errors import ModelError, require_extra
from model.tokenizer import Tokenizer
from runtime.loop import GenerationError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """What to constrain to: an llguidance grammar (JSON text), and a short description for errors."""

    spec: str
    what: str


def json_schema_grammar(schema: dict[str, Any] | bool) -> Grammar:
    import llguidance

    try:  # compact JSON (", " and ": " as separators, no other whitespace): a model cannot wander in blanks
        return Grammar(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE), "JSON schema")
    except (ValueError, TypeError) as e:
        raise GenerationError(f"invalid JSON schema: {e}") from None


def json_object_grammar() -> Grammar:
    return Grammar(json_schema_grammar({"type": "object"}).spec, "JSON object")


def regex_grammar(regex: str) -> Grammar:
    import llguidance

    return Grammar(llguidance.LLMatcher.grammar_from_regex(regex), "regex")


def lark_grammar(lark: str) -> Grammar:
    import llguidance

    return Grammar(llguidance.LLMatcher.grammar_from_lark(lark), "Lark grammar")


def read_json_schema(path: str) -> Grammar:
    """--json-schema FILE."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: JSON schema file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a JSON schema file ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ModelError(f"{path}: a JSON schema is an object (or true/false), got {type(schema).__name__}")
    return json_schema_grammar(schema)


_LL_TOKENIZERS: dict[str, Any] = {}


def ll_tokenizer(tok: Tokenizer) -> Any:
    """The tokenizer as llguidance sees it (built once per vocabulary: ~0.3 s for GPT-2). A char vocabulary
    has no end-of-text token: it gets a virtual one past the vocabulary, which is never chosen."""
    key = json.dumps(tok.spec, sort_keys=True)
    if key not in _LL_TOKENIZERS:
        require_extra("structured", "llguidance")
        import llguidance
        from llguidance.tiktoken import lltokenizer_from_encoding

        if tok.encoding is not None:  # GPT-2 BPE (tiktoken)
            _LL_TOKENIZERS[key] = lltokenizer_from_encoding(tok.encoding, n_vocab=tok.n_vocab)
        else:
            _LL_TOKENIZERS[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_CharVocab(tok)))
    return _LL_TOKENIZERS[key]


class _CharVocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer, for a char vocabulary + a virtual end token."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.tokens = [tok.decode([i]).encode("utf-8") for i in range(tok.n_vocab)] + [b"<|end|>"]
        self.eos_token_id, self.bos_token_id, self.special_token_ids = tok.n_vocab, None, [tok.n_vocab]

    def __call__(self, s: str) -> list[int]:
        return self.tok.encode(s)


@dataclass(eq=False)
class Guide:
    """One row's place in its grammar."""

    matcher: Any
    n_vocab: int
    ll_vocab: int  # llguidance's vocabulary: n_vocab, + 1 for a char vocabulary's virtual end token
    mask: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mask = np.zeros(((self.ll_vocab + 31) // 32,), dtype=np.int32)

    def allowed(self) -> torch.Tensor:
        """bool [n_vocab]: the tokens that keep the output inside the grammar now."""
        self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        bits = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[:self.n_vocab]
        return torch.from_numpy(bits.astype(bool))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """Complete: nothing may follow (or the matcher failed: the row cannot go on either)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def new_guide(grammar: Grammar, tok: Tokenizer) -> Guide:
    """A row's guide; GenerationError if the grammar is invalid or the vocabulary cannot start it."""
    import llguidance

    lltok = ll_tokenizer(tok)
    matcher = llguidance.LLMatcher(lltok, grammar.spec, log_level=0)
    if matcher.is_error():
        raise GenerationError(f"invalid {grammar.what}: {matcher.get_error()}")
    guide = Guide(matcher, tok.n_vocab, lltok.vocab_size)
    if not bool(guide.allowed().any()):
        raise GenerationError(f"the model's {tok.n_vocab}-token vocabulary cannot spell any output the {grammar.what} "
                              "allows (no token can start it)")
    return guide


def constrain(logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
    """logits [rows, n_vocab] fp32 CPU -> a copy with each guided row's disallowed tokens at -inf (a row whose
    grammar allows none of the vocabulary's tokens is left as it is: it ends when its token is refused)."""
    logits = logits.clone()
    for i, guide in enumerate(guides):
        if guide is not None and not guide.finished:
            allowed = guide.allowed()
            if bool(allowed.any()):
                logits[i].masked_fill_(~allowed, float("-inf"))
    return logits
