"""nanoGPT ckpt.pt layout (as its train.py saves it) and meta.pkl char vocabularies."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, ModelError, load_model
from tests.helpers import NANOGPT_MODEL_ARGS as MODEL_ARGS
from tests.helpers import nanogpt_state, save_nanogpt_ckpt

FP32_LOGITS_ATOL = 1e-4
def nanogpt_forward(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """An independent, functional restatement of nanoGPT's model.py forward (bias=False)."""
    C, H = MODEL_ARGS["n_embd"], MODEL_ARGS["n_head"]
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(MODEL_ARGS["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], None, 1e-5)
        q, k, v = (h @ sd[p + "attn.c_attn.weight"].T).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], None, 1e-5)
        x = x + torch.nn.GELU()(h @ sd[p + "mlp.c_fc.weight"].T) @ sd[p + "mlp.c_proj.weight"].T
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], None, 1e-5)
    return x @ sd["lm_head.weight"].T


def test_nanogpt_checkpoint_loads_with_erf_gelu(tmp_path):
    sd = nanogpt_state()
    save_nanogpt_ckpt(tmp_path / "ckpt.pt", sd)
    model, tok = load_model(tmp_path / "ckpt.pt")
    assert model.config == GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50304,
                                     bias=False, gelu="erf")
    assert tok.spec == {"type": "gpt2"} and tok.n_vocab == 50257  # no meta.pkl -> GPT-2 BPE

    idx = torch.randint(0, 50257, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, _ = model(idx)
        ref = nanogpt_forward(sd, idx)
        tanh_model = GPT(GPTConfig(**{**model.config.to_dict(), "gelu": "tanh"}))
        tanh_model.load_state_dict(model.state_dict())
        tanh_logits, _ = tanh_model.eval()(idx)
    assert (got - ref).abs().max().item() <= FP32_LOGITS_ATOL
    # the GELU form matters at this scale: the tanh form would be measurably off
    assert (tanh_logits - ref).abs().max().item() > 10 * FP32_LOGITS_ATOL


def test_meta_pkl_char_vocab_found_like_sample_py(tmp_path, monkeypatch):
    chars = sorted(set("hello world\nThe quick brown fox"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (tmp_path / "out").mkdir()
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "meta.pkl").write_bytes(pickle.dumps(meta))
    save_nanogpt_ckpt(tmp_path / "out" / "ckpt.pt", nanogpt_state())
    monkeypatch.chdir(tmp_path)  # sample.py looks in data/<dataset>/meta.pkl from cwd
    _, tok = load_model("out/ckpt.pt")
    assert tok.spec["type"] == "char" and tok.n_vocab == len(chars)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(ModelError, match="'Z' is not in the model's"):
        tok.encode("hello Zed")


class _Exploit:
    def __reduce__(self):
        return (print, ("PWNED",))


def test_meta_pkl_with_code_is_refused_not_run(tmp_path, capsys):
    save_nanogpt_ckpt(tmp_path / "ckpt.pt", nanogpt_state())
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}, "x": _Exploit()}))
    with pytest.raises(ModelError, match=r"meta\.pkl.*refusing to load builtins\.print"):
        load_model(tmp_path / "ckpt.pt")
    assert "PWNED" not in capsys.readouterr().out
