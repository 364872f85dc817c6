"""Bad inputs to the loaders and tokenizers: each a one-line ModelError naming the file and problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import ModelError, load_model
from model.tokenizer import BPE_DIR, gpt2_tokenizer
from tests.helpers import save_random_hf_gpt2

TINY_HF = dict(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=100)


@pytest.fixture
def hf_folder(tmp_path):
    return save_random_hf_gpt2(tmp_path / "hf", **TINY_HF)


def load_error(src) -> str:
    with pytest.raises(ModelError) as e:
        load_model(src)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_path(tmp_path):
    assert "no such file or folder" in load_error(tmp_path / "nope" / "ckpt.pt")


def test_folder_without_config(tmp_path):
    assert "no config.json" in load_error(tmp_path)


def test_truncated_safetensors(hf_folder):
    f = hf_folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    msg = load_error(hf_folder)
    assert str(f) in msg and "cannot read safetensors" in msg


def test_truncated_ckpt(tmp_path):
    torch.save({"model": {}, "model_args": {}}, tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    msg = load_error(tmp_path / "ckpt.pt")
    assert "ckpt.pt" in msg and "cannot load checkpoint" in msg


def test_not_a_nanogpt_ckpt(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    assert "not a nanoGPT checkpoint" in load_error(tmp_path / "x.pt")


def test_missing_weight(hf_folder):
    rewrite_weights(hf_folder, lambda s: s.pop("transformer.h.0.mlp.c_fc.bias"))
    msg = load_error(hf_folder)
    assert "model.safetensors: missing weights (1): transformer.h.0.mlp.c_fc.bias" in msg


def test_unexpected_weight(hf_folder):
    rewrite_weights(hf_folder, lambda s: s.__setitem__("transformer.h.0.extra.weight", torch.zeros(3)))
    assert "unexpected weights (1): transformer.h.0.extra.weight" in load_error(hf_folder)


def test_misshaped_weight(hf_folder):
    rewrite_weights(hf_folder, lambda s: s.__setitem__("transformer.wpe.weight", torch.zeros(16, 32)))
    assert "weight transformer.wpe.weight has shape (16, 32), config expects (32, 32)" in load_error(hf_folder)


def test_unsupported_activation(hf_folder):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    assert "activation_function 'relu' is not supported" in load_error(hf_folder)


def test_config_not_json(hf_folder):
    (hf_folder / "config.json").write_text("{not json")
    assert "config.json: not readable JSON" in load_error(hf_folder)


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    msg = load_error("gpt2-medium")
    assert "gpt2-medium: cannot fetch from the Hugging Face hub" in msg and "pass a local folder" in msg


def test_bpe_file_with_wrong_hash(tmp_path):
    shutil.copytree(BPE_DIR, tmp_path / "bpe")
    (tmp_path / "bpe" / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(ModelError, match="vocab.bpe: sha256 .* does not match"):
        gpt2_tokenizer(tmp_path / "bpe")
