"""Checkpoint loaders: our own folder format (the bundled demo), Hugging Face GPT-2 (local
folder or hub id), nanoGPT ckpt.pt, and export artifacts (the weights read back from model.onnx).
Every failure is a one-line ModelError naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.artifact import is_artifact, onnx_state_dict, read_artifact
from model.config import GPTConfig
from model.errors import ModelError
from model.gpt import GPT
from model.tokenizer import BPE_DIR, GPT2_EOT, Tokenizer, gpt2_tokenizer, load_meta_pkl, tokenizer_from_spec

DEMO_DIR = Path(__file__).parent / "demo"
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "erf"}
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def load_model(src: str | os.PathLike, meta: str | os.PathLike | None = None) -> tuple[GPT, Tokenizer]:
    """Any source the toolkit accepts -> (fp32 model in eval mode, tokenizer)."""
    src = str(src)
    path = DEMO_DIR if src == "demo" else Path(src)
    if path.is_dir() and is_artifact(path):
        art = read_artifact(path, verify=False)
        model, tok = build_model(art.config, onnx_state_dict(art.model_path), art.model_path), art.tokenizer
    elif path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{path}: no config.json in this folder")
        cfg = _read_json(cfg_path)
        if "model" in cfg and "tokenizer" in cfg:
            model, tok = load_own_checkpoint(path, cfg)
        else:
            model, tok = load_hf_folder(path, cfg)
    elif path.is_file():
        model, tok = load_nanogpt_ckpt(path, meta)
    elif path.suffix in (".pt", ".pth", ".bin", ".json", ".onnx") or os.sep in src or src.startswith("."):
        raise ModelError(f"{src}: no such file or folder")
    elif HUB_ID.match(src):
        model, tok = load_hf_folder(_hub_snapshot(src))
    else:
        raise ModelError(f"{src}: not a file, a folder or a Hugging Face hub id")
    return model.eval(), tok


# ---- our own format: config.json {"model": GPTConfig, "tokenizer": spec} + model.safetensors

def save_checkpoint(model: GPT, tokenizer: Tokenizer, out_dir: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"))
        cfg = {"model": model.config.to_dict(), "tokenizer": tokenizer.spec, **(extra or {})}
        Path(tmp, "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        for name in ("model.safetensors", "config.json"):
            os.replace(os.path.join(tmp, name), out_dir / name)


def load_own_checkpoint(path: Path, cfg: dict[str, Any]) -> tuple[GPT, Tokenizer]:
    config = _config_or_error(path / "config.json", lambda: GPTConfig.from_dict(cfg["model"]))
    weights = path / "model.safetensors"
    tokenizer = tokenizer_from_spec(cfg["tokenizer"], base_dir=path)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    return build_model(config, _read_safetensors(weights), weights), tokenizer


# ---- Hugging Face GPT-2

def load_hf_folder(path: Path, cfg: dict[str, Any] | None = None) -> tuple[GPT, Tokenizer]:
    cfg_path = path / "config.json"
    cfg = _read_json(cfg_path) if cfg is None else cfg
    config = _config_or_error(cfg_path, lambda: hf_config_to_gpt(cfg))
    if (path / "model.safetensors").is_file():
        weights = path / "model.safetensors"
        state = _read_safetensors(weights)
    elif (path / "model.safetensors.index.json").is_file():  # sharded save_pretrained output
        weights = path / "model.safetensors.index.json"
        shards = sorted(set(_read_json(weights).get("weight_map", {}).values()))
        if not shards:
            raise ModelError(f"{weights}: no weight_map")
        state = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(f"{path / shard}: shard listed in {weights.name} is missing")
            state.update(_read_safetensors(path / shard))
    elif (path / "pytorch_model.bin").is_file():
        weights = path / "pytorch_model.bin"
        state = _torch_load(weights)
    else:
        raise ModelError(f"{path}: no model.safetensors or pytorch_model.bin")
    state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
             for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith(MASK_BUFFERS)}
    for k in list(state):
        if k.endswith(HF_CONV1D):  # HF Conv1D stores [in, out]; nn.Linear wants [out, in]
            state[k] = state[k].t()
    return build_model(config, state, weights), gpt2_tokenizer()


def hf_config_to_gpt(cfg: dict[str, Any]) -> GPTConfig:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not gpt2")
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_GELU:
        raise ValueError(f"activation_function {act!r} is not supported (use one of {sorted(HF_GELU)})")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise ValueError("non-standard attention scaling is not supported")
    return GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                     block_size=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
                     vocab_size=cfg["vocab_size"], bias=True, gelu=HF_GELU[act],
                     layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5))


def save_hf_folder(model: GPT, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> None:
    """The inverse of load_hf_folder: config.json + model.safetensors in transformers' GPT2LMHeadModel layout
    (Conv1D weights stored [in, out]) and the GPT-2 BPE files as vocab.json + merges.txt, so that other tools
    (llama.cpp's converter, optimum) read the same weights. Written to a temp folder, then renamed into place."""
    c = model.config
    if not c.bias:
        raise ModelError("a Hugging Face GPT-2 folder has biases everywhere; this model has bias=False")
    if tokenizer.spec.get("type") != "gpt2":
        raise ModelError("a Hugging Face GPT-2 folder carries the GPT-2 BPE tokenizer, "
                         f"not {tokenizer.spec.get('type')!r}")
    gelu = {"tanh": "gelu_new", "erf": "gelu"}[c.gelu]
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head,
           "n_embd": c.n_embd, "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
           "layer_norm_epsilon": c.layer_norm_eps, "activation_function": gelu, "bos_token_id": GPT2_EOT,
           "eos_token_id": GPT2_EOT, "tie_word_embeddings": True, "torch_dtype": "float32"}
    state = {}
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":  # tied to wte
            state[k] = (v.t() if k.endswith(HF_CONV1D) else v).detach().float().contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"config.json": json.dumps(cfg, indent=1) + "\n",
             "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.block_size,
                                                  "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                  "unk_token": "<|endoftext|>"}) + "\n"}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        shutil.copyfile(BPE_DIR / "encoder.json", os.path.join(tmp, "vocab.json"))
        shutil.copyfile(BPE_DIR / "vocab.bpe", os.path.join(tmp, "merges.txt"))
        for name in ("model.safetensors", *files, "vocab.json", "merges.txt"):
            os.replace(os.path.join(tmp, name), out_dir / name)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # optional: the "hub" extra
    except ImportError:
        raise ModelError(f"{repo_id}: huggingface_hub is not installed: pip install -e \".[hub]\" (the hub extra), "
                         "or pass a local folder") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:
        raise ModelError(f"{repo_id}: cannot fetch from the Hugging Face hub ({type(e).__name__}); "
                         "offline? pass a local folder with config.json and model.safetensors") from None


# ---- nanoGPT ckpt.pt

def load_nanogpt_ckpt(path: Path, meta: str | os.PathLike | None = None) -> tuple[GPT, Tokenizer]:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ModelError(f"{path}: not a nanoGPT checkpoint (needs keys 'model' and 'model_args')")
    args = ckpt["model_args"]
    config = _config_or_error(path, lambda: GPTConfig(
        n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
        block_size=args["block_size"], vocab_size=args["vocab_size"], bias=bool(args["bias"]),
        gelu="erf"))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(MASK_BUFFERS)}
    model = build_model(config, state, path)
    return model, _nanogpt_tokenizer(path, ckpt, meta)


def _nanogpt_tokenizer(path: Path, ckpt: dict[str, Any], meta: str | os.PathLike | None) -> Tokenizer:
    if meta is not None:
        if not Path(meta).is_file():
            raise ModelError(f"{meta}: meta.pkl not found")
        return load_meta_pkl(Path(meta))
    candidates = [path.parent / "meta.pkl"]
    dataset = (ckpt.get("config") or {}).get("dataset") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(dataset, str):  # where nanoGPT's sample.py looks, from cwd and from out_dir/..
        candidates += [Path("data") / dataset / "meta.pkl", path.parent.parent / "data" / dataset / "meta.pkl"]
    for c in candidates:
        if c.is_file():
            return load_meta_pkl(c)
    return gpt2_tokenizer()


# ---- shared helpers

def build_model(config: GPTConfig, state: dict[str, torch.Tensor], source: Path) -> GPT:
    """Instantiate and load strictly: every missing, unexpected or mis-shaped weight is an error."""
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(state)
    lm_head = state.pop("lm_head.weight", None)
    wte = state.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
        raise ModelError(f"{source}: lm_head.weight is not tied to transformer.wte.weight")
    missing = sorted(k for k in expected if k not in state and k != "lm_head.weight")
    unexpected = sorted(k for k in state if k not in expected)
    if missing:
        raise ModelError(f"{source}: missing weights ({len(missing)}): {', '.join(missing[:3])}"
                         + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        raise ModelError(f"{source}: unexpected weights ({len(unexpected)}): {', '.join(unexpected[:3])}"
                         + (" ..." if len(unexpected) > 3 else ""))
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise ModelError(f"{source}: weight {k} has shape {tuple(v.shape)}, config expects {expected[k]}")
    state = {k: v.float() for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _config_or_error(path: Path, make: Any) -> GPTConfig:
    try:
        return make()
    except KeyError as e:
        raise ModelError(f"{path}: config is missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: bad config ({e})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise ModelError(f"{path}: cannot read safetensors file ({_one_line(e)})") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, or a non-weights object
        raise ModelError(f"{path}: cannot load checkpoint ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
