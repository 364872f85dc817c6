"""Train the bundled demo model: nanoGPT's shakespeare_char recipe scaled for 2 CPU cores.

    python -m model.demo.train --data ../shared/data/tinyshakespeare.txt

Char vocabulary, 90/10 train/val split, AdamW with warm-up and cosine decay. Writes
model/demo/{config.json, model.safetensors} (our checkpoint format) atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.errors import CliParser, ModelError, run_cli
from model.gpt import GPT
from model.load import DEMO_DIR, save_checkpoint
from model.tokenizer import char_tokenizer

DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEMO_CONFIG = dict(n_layer=4, n_head=4, n_embd=192, block_size=128, bias=True, gelu="erf")


def main() -> None:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt", help="corpus (default: %(default)s)")
    p.add_argument("--out", default=str(DEMO_DIR), help="output folder (default: %(default)s)")
    p.add_argument("--iters", type=int, default=3000, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evals (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="(default: %(default)s)")
    args = p.parse_args()

    path = Path(args.data)
    if not path.is_file():
        raise ModelError(f"{path}: corpus not found")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != DATA_SHA256:
        raise ModelError(f"{path}: sha256 does not match tinyshakespeare ({DATA_SHA256})")
    text = raw.decode("utf-8")
    chars = sorted(set(text))
    tok = char_tokenizer(chars)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=len(chars), **DEMO_CONFIG)
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
