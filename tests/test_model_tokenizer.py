"""GPT-2 BPE built offline from the vendored files, and char vocabularies."""

from __future__ import annotations

import pytest

from model import ModelError
from model.tokenizer import char_tokenizer, gpt2_tokenizer, tokenizer_from_spec


def test_gpt2_bpe_known_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256] == [tok.eot_token]
    assert tok.n_vocab == 50257
    text = "Thou art more lovely and more temperate: ünïcødé ✓"
    assert tok.decode(tok.encode(text)) == text


def test_char_vocab_roundtrip_and_spec():
    tok = char_tokenizer(list("\n !abc"))
    assert tok.encode("ab c!\n") == [3, 4, 1, 5, 2, 0]
    again = tokenizer_from_spec(tok.spec)
    assert again.decode(again.encode("cab")) == "cab" and again.eot_token is None
    with pytest.raises(ModelError, match="character 'z' is not in the model's 6-character vocabulary"):
        tok.encode("abz")


def test_unknown_spec():
    with pytest.raises(ModelError, match="unknown tokenizer spec"):
        tokenizer_from_spec({"type": "sentencepiece"})
