"""Train the bundled demo models: nanoGPT's shakespeare_char recipe scaled for 2 CPU cores.

    python -m model.demo.train --data ../shared/data/tinyshakespeare.txt
    python -m model.demo.train --layout nanogpt          # the nanoGPT-layout checkpoint (model/demo/nanogpt)

Char vocabulary, 90/10 train/val split, AdamW with warm-up and cosine decay. The default layout writes
model/demo/{config.json, model.safetensors} (our checkpoint format); --layout nanogpt writes a smaller
bias=False model as nanoGPT's train.py saves it: ckpt.pt with `model` (keys with torch.compile's
`_orig_mod.` prefix, lm_head.weight tied to wte), `model_args`, `iter_num`, `best_val_loss`, `config`,
the vocabulary padded to a multiple of 64 as nanoGPT pads GPT-2's, and meta.pkl (itos/stoi) beside it.
Everything is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.errors import CliParser, ModelError, run_cli
from model.files import write_atomic
from model.gpt import GPT
from model.load import DEMO_DIR, save_checkpoint
from model.tokenizer import Tokenizer, char_tokenizer

DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEMO_CONFIG = dict(n_layer=4, n_head=4, n_embd=192, block_size=128, bias=True, gelu="erf")
NANOGPT_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, bias=False, gelu="erf")
NANOGPT_DIR = DEMO_DIR / "nanogpt"
LAYOUTS = {"ours": (DEMO_CONFIG, DEMO_DIR, 3000), "nanogpt": (NANOGPT_CONFIG, NANOGPT_DIR, 1000)}


def split_corpus(path: Path) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """tinyshakespeare (sha256 checked) -> char tokenizer, train ids (first 90%), val ids (last 10%)."""
    if not path.is_file():
        raise ModelError(f"{path}: corpus not found")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != DATA_SHA256:
        raise ModelError(f"{path}: sha256 does not match tinyshakespeare ({DATA_SHA256})")
    text = raw.decode("utf-8")
    tok = char_tokenizer(sorted(set(text)))
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    return tok, data[:n], data[n:]


def save_nanogpt(model: GPT, tok: Tokenizer, out_dir: Path, step: int, val_loss: float,
                 args: argparse.Namespace) -> None:
    """ckpt.pt + meta.pkl as nanoGPT's train.py and data/shakespeare_char/prepare.py write them (no optimizer
    state: it would triple the file and no loader reads it)."""
    c = model.config
    state = {f"_orig_mod.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      bias=c.bias, vocab_size=c.vocab_size, dropout=0.0)
    ckpt = {"model": state, "model_args": model_args, "iter_num": step, "best_val_loss": torch.tensor(val_loss),
            "config": {"dataset": "shakespeare_char", "batch_size": args.batch_size, "learning_rate": args.lr,
                       "max_iters": args.iters, "seed": args.seed, "compile": True, "data_sha256": DATA_SHA256}}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = tok.spec["chars"]
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {ch: i for i, ch in enumerate(chars)}}
    write_atomic(out_dir / "meta.pkl", pickle.dumps(meta))
    write_atomic(out_dir / "ckpt.pt", buf.getvalue())


def main() -> None:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt", help="corpus (default: %(default)s)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="ours",
                   help="ours: model/demo (bias, 192 wide); nanogpt: model/demo/nanogpt/ckpt.pt (default: ours)")
    p.add_argument("--out", help="output folder (default: model/demo, or model/demo/nanogpt for --layout nanogpt)")
    p.add_argument("--iters", type=int, help="optimizer steps (default: 3000, nanogpt 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evals (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="(default: %(default)s)")
    args = p.parse_args()
    model_config, default_out, default_iters = LAYOUTS[args.layout]
    args.out = Path(args.out or default_out)
    args.iters = args.iters or default_iters

    tok, train, val = split_corpus(Path(args.data))
    n_vocab = tok.n_vocab
    vocab_size = -(-n_vocab // 64) * 64 if args.layout == "nanogpt" else n_vocab  # nanoGPT pads to 64s

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=vocab_size, **model_config)
    model = GPT(config)
    print(f"demo model: {model.num_params() / 1e6:.2f}M params, {config}", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    T = config.block_size

    def batch(split: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(split) - T - 1, (args.batch_size,), generator=gen)
        return (torch.stack([split[i:i + T] for i in ix]), torch.stack([split[i + 1:i + 1 + T] for i in ix]))

    @torch.no_grad()
    def val_loss(batches: int = 40) -> float:
        model.eval()
        gen = torch.Generator().manual_seed(0)  # the same val batches at every eval
        losses = [F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
                  for x, y in (batch(val, gen) for _ in range(batches))]
        model.train()
        return sum(losses) / len(losses)

    warmup, min_lr = 100, args.lr / 10
    best, t0 = float("inf"), time.time()
    for it in range(args.iters + 1):
        if it % args.eval_every == 0 or it == args.iters:
            vl = val_loss()
            print(f"step {it:5d}  val loss {vl:.4f}  {time.time() - t0:6.0f}s", file=sys.stderr, flush=True)
            if vl < best:
                best = vl
                if args.layout == "nanogpt":
                    save_nanogpt(model, tok, args.out, it, vl, args)
                else:
                    save_checkpoint(model, tok, args.out, extra={"training": {
                        "data_sha256": DATA_SHA256, "step": it, "val_loss": round(vl, 4),
                        "iters": args.iters, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}})
        if it == args.iters:
            break
        lr = args.lr * it / warmup if it < warmup else \
            min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * (it - warmup) / (args.iters - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train)
        loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    print(f"best val loss {best:.4f} nats/char, {time.time() - t0:.0f}s; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
