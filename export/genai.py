"""genai_config.json (and, for GPT-2 BPE, tokenizer.json + tokenizer_config.json) so that ONNX Runtime
GenAI runs an artifact as is: `onnxruntime_genai.Model(DIR)`.

The graph's contract already is what genai's generic decoder-only model type ("decoder") feeds: input_ids,
attention_mask, position_ids, past_key_values.%d.key|value in, logits and present.%d.key|value out,
past and present [batch, n_head, seq, head_dim]. The tokenizer files are GPT-2's byte-level BPE
(the vendored encoder.json + vocab.bpe) in Hugging Face's tokenizer.json form; char vocabularies get no
tokenizer files (genai is then driven with token ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.artifact import LOGITS, MODEL_FILE, TOKEN_INPUTS, past_name, present_name
from model.config import GPTConfig
from model.tokenizer import BPE_DIR

GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def genai_config(config: GPTConfig, max_seq_len: int, eot: int | None, n_vocab: int) -> dict[str, Any]:
    # char vocabularies have no end token, but genai needs one in range: the last id (a padding row never
    # sampled where nanoGPT padded the vocabulary; else a real character: then set min_length to run past it)
    end = eot if eot is not None else config.vocab_size - 1
    return {
        "model": {
            "type": "decoder",  # genai's generic decoder-only model: separate past key/value per layer
            "bos_token_id": end, "eos_token_id": end, "pad_token_id": end,
            "context_length": max_seq_len,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": config.head_dim, "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head, "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "inputs": {**{name: name for name in TOKEN_INPUTS}, "past_key_names": past_name("%d", "key"),
                           "past_value_names": past_name("%d", "value")},
                "outputs": {"logits": LOGITS, "present_key_names": present_name("%d", "key"),
                            "present_value_names": present_name("%d", "value")},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": max_seq_len, "min_length": 0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
                   "past_present_share_buffer": False},
    }


def gpt2_tokenizer_json(encoder: dict[str, int], merges_text: str, eot: int) -> dict[str, Any]:
    """GPT-2's byte-level BPE in the tokenizer.json layout (what Hugging Face's GPT2TokenizerFast saves)."""
    merges = [line for line in merges_text.splitlines()[1:] if line.strip()]  # line 0: "#version: 0.2"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": encoder,
                  "merges": merges},
    }


def write_genai_files(out_dir: Path, config: GPTConfig, tokenizer: Any, max_seq_len: int) -> list[str]:
    """Write genai_config.json (+ tokenizer files for GPT-2 BPE) into out_dir; returns the names written."""
    eot = getattr(tokenizer, "eot_token", None)
    written = [GENAI_CONFIG]
    (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(config, max_seq_len, eot, tokenizer.n_vocab),
                                                   indent=1) + "\n")
    if tokenizer.spec.get("type") == "gpt2":
        encoder = json.loads((BPE_DIR / "encoder.json").read_text())
        merges = (BPE_DIR / "vocab.bpe").read_text(encoding="utf-8")
        (out_dir / "tokenizer.json").write_text(json.dumps(gpt2_tokenizer_json(encoder, merges, eot)))
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": max_seq_len}, indent=1))
        written += list(GENAI_TOKENIZER_FILES)
    return written
