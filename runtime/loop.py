"""The one generation loop every backend shares (torch, onnxruntime, tensorrt).

A backend only implements reset / prefill / decode_one_token (runtime/backend.py); this loop
left-pads the batch, builds attention_mask and position_ids, samples, stops and times.

Sampling semantics (also in the README):
- greedy (temperature 0 or greedy=True): argmax of the logits.
- otherwise: logits / temperature, then top-k (keep the k largest), then top-p (keep the
  smallest set of most likely tokens whose probability sums to >= p; always at least one),
  then one draw from the renormalised distribution.
- logit_bias, presence_penalty and frequency_penalty (OpenAI's, runtime/sampling.py) change the logits
  first, for greedy too.
- only ids < tokenizer.n_vocab are ever chosen (nanoGPT pads the embedding to 50304 rows).
- draws use a CPU torch.Generator seeded with `seed` (sample i of a CLI run uses seed + i), so a
  seed reproduces the same text for a given backend; backends whose logits differ in the last
  bits may, rarely, draw differently.
- a row stops at the tokenizer's end-of-text token (not included in the text), right after a
  stop string (the text is cut before the stop string), or at max_new_tokens.
- prompt tokens + max_new_tokens must fit in the model's block_size (or the smaller max_seq_len an
  artifact was exported for): otherwise a GenerationError before any work, or with truncate=True the
  prompt keeps only its last (limit - max_new_tokens) tokens.
- sliding_window=True is nanoGPT's sample.py instead: any prompt length and any max_new_tokens; each
  token is predicted from the row's last `limit` tokens (`idx[:, -block_size:]`, positions 0..limit-1).
  While prompt + new tokens fit, that is the KV-cached loop; once they do not, learned absolute
  positions mean every cached key/value changes when the window moves, so each further step re-runs
  the whole window (a prefill of `limit` tokens per new token instead of one cached token).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.errors import ModelError
from runtime.backend import Backend
from runtime.sampling import MAX_PENALTY, adjust_logits, check_logit_bias
from runtime.speculate import Drafter, verify_greedy, verify_sampled

StreamCallback = Callable[[int, str], None]  # (row, new text) as soon as it is final


class GenerationError(ModelError, ValueError):
    """Bad sampling parameters or prompts, raised before any model work (a one-line message)."""


@dataclass(frozen=True)
class SamplingParams:
    """The single source of the defaults (the CLI's argparse defaults come from here)."""

    max_new_tokens: int = 200
    greedy: bool = False
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eot: bool = True
    truncate: bool = False
    sliding_window: bool = False  # nanoGPT's sample.py past the context limit (see the module docstring)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits (runtime/sampling.py)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: Any = None  # runtime.structured.Grammar: structured output (JSON schema, regex, Lark)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # `not >=` also catches NaN
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise GenerationError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")
        for name, value in (("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)):
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise GenerationError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if self.truncate and self.sliding_window:
            raise GenerationError("truncate and sliding_window exclude each other: the sliding window already "
                                  "conditions on the end of a long prompt")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class GenerationResult:
    prompt_tokens: list[list[int]]  # per row, after truncation
    tokens: list[list[int]]  # new tokens per row, up to (not including) eot; stop strings included
    texts: list[str]  # new text per row, cut before any stop string
    finish_reasons: list[str]  # "eot" | "stop" | "length"
    seed: int | None  # the seed actually used (None for greedy)
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps, summed over rows still running
    draft_proposed: int = 0  # speculative decoding: tokens the drafter proposed, and how many the model kept
    draft_accepted: int = 0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def context_limit(backend: Backend) -> tuple[int, str]:
    """The most tokens (prompt + new) a sequence may hold on this backend, and what sets it:
    the model's block_size, or a smaller max_seq_len an artifact or engine was built for."""
    block_size = backend.config.block_size
    built_for = backend.max_seq_len
    if built_for < block_size:
        return built_for, f"the {backend.name} artifact's max_seq_len {built_for}"
    return block_size, f"the model's block_size {block_size}"


def check_fits(prompt_lens: Sequence[int], max_new_tokens: int, limit: int, limit_name: str,
               truncate: bool) -> None:
    if truncate:
        if max_new_tokens >= limit:
            raise GenerationError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt within {limit_name}")
        return
    longest = max(prompt_lens)
    if longest + max_new_tokens > limit:
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                              f"{longest + max_new_tokens} exceeds {limit_name}; shorten the prompt, lower "
                              "max_new_tokens, pass --truncate to keep only the end of the prompt, or "
                              f"--sliding-window to condition each token on the last {limit} tokens as "
                              "nanoGPT's sample.py does")


def check_prompts(prompts: Sequence[Sequence[int]], n_vocab: int) -> None:
    """At least one prompt, none empty, every id in the tokenizer's vocabulary."""
    if not prompts:
        raise GenerationError("no prompts")
    for p in prompts:
        if len(p) == 0:
            raise GenerationError("empty prompt: give at least one token")
        bad = [t for t in p if not 0 <= t < n_vocab]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the tokenizer's vocabulary (0..{n_vocab - 1})")


def prepare_prompts(prompts: Sequence[Sequence[int]], params: SamplingParams, backend: Backend) -> list[list[int]]:
    """Check the prompts before any work; with params.truncate, cut them to fit."""
    check_prompts(prompts, backend.tokenizer.n_vocab)
    if problem := check_logit_bias(params.logit_bias, backend.tokenizer.n_vocab):
        raise GenerationError(problem)
    if params.sliding_window:
        return [list(p) for p in prompts]
    limit, limit_name = context_limit(backend)
    check_fits([len(p) for p in prompts], params.max_new_tokens, limit, limit_name, params.truncate)
    keep = limit - params.max_new_tokens
    return [list(p[-keep:]) if params.truncate else list(p) for p in prompts]


def sample_next(logits: torch.Tensor, params: SamplingParams, n_vocab: int,
                generator: torch.Generator | None, generated: Sequence[Sequence[int]] | None = None,
                guides: Sequence[Any] | None = None) -> torch.Tensor:
    """logits [batch, vocab_size] (any device) -> next ids [batch] int64 on CPU. generated[i]: row i's new
    tokens so far (the penalties count them); guides[i]: row i's structured-output guide (the caller
    advances it with the token chosen)."""
    logits = logits[:, :n_vocab].float().cpu()
    if params.logit_bias or params.presence_penalty or params.frequency_penalty:
        logits = adjust_logits(logits, params.logit_bias, params.presence_penalty, params.frequency_penalty, generated)
    if guides is not None:
        from runtime.structured import constrain  # (it imports this module)

        logits = constrain(logits, list(guides))
    if params.is_greedy:
        # numpy's argmax (same result: the first maximum, NaN counting as the maximum) runs on this thread;
        # torch's splits 50k logits across its intra-op pool, whose threads then keep spinning through the
        # next step and take the cores from ONNX Runtime's own pool (README "Where the loop's time went")
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return torch.multinomial(sampling_probs(logits, params, n_vocab), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, params: SamplingParams, n_vocab: int) -> torch.Tensor:
    """logits [rows, vocab_size] -> the distribution sampling draws from, [rows, n_vocab] float32 on CPU
    (temperature, then top-k, then top-p; the module docstring). Not for greedy params."""
    logits = logits[:, :n_vocab].float().cpu()
    # shift so the largest is 0 first: a tiny temperature then gives -inf / 0, never inf - inf = NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k is not None and params.top_k < n_vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def check_drafter(backend: Backend, drafter: Drafter, rows: int, params: SamplingParams | None = None) -> None:
    """Speculative decoding: one row, a backend whose steps return every new position's logits, a draft
    model with the same tokenizer, and no logit_bias, penalties or grammar (verification uses raw logits)."""
    if rows != 1:
        raise GenerationError(f"speculative decoding runs one prompt at a time, got {rows}")
    if params is not None and (params.logit_bias or params.presence_penalty or params.frequency_penalty
                               or params.grammar is not None):
        raise GenerationError("speculative decoding does not take logit_bias, presence/frequency penalties or a "
                              "JSON schema (its verification reads the model's own logits)")
    if not backend.verifies_tokens:
        raise GenerationError(f"speculative decoding needs the logits of several new tokens, which {backend.name} "
                              "cannot return (onnxruntime: export with --graph ort or --all-logits)")
    draft = getattr(drafter, "backend", None)  # ModelDrafter
    if draft is not None and (draft.tokenizer.n_vocab != backend.tokenizer.n_vocab
                              or draft.tokenizer.spec != backend.tokenizer.spec):
        raise GenerationError(f"the draft model's tokenizer ({draft.tokenizer.n_vocab} tokens) is not the "
                              f"model's ({backend.tokenizer.n_vocab})")


def new_guides(params: SamplingParams, tok: Any, rows: int) -> list[Any] | None:
    """Each row's structured-output guide (runtime/structured.py), or None without a grammar."""
    if params.grammar is None:
        return None
    from runtime.structured import new_guide  # it imports this module; and llguidance only when asked for

    return [new_guide(params.grammar, tok) for _ in range(rows)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [batch, longest], attention_mask [batch, longest] (1 real, 0 padding)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, longest - len(p):] = 1
    return ids, mask


def window_inputs(sequences: Sequence[Sequence[int]], limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prefill of each row's last `limit` tokens (nanoGPT's `idx[:, -block_size:]`), left-padded:
    -> input_ids, attention_mask, position_ids, each [batch, min(longest, limit)]; positions count a
    row's real tokens from 0."""
    ids, mask = left_pad([s[-limit:] for s in sequences])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class StopStringScanner:
    """Per-row text state: finds stop strings and streams only text that cannot become one.

    Decoding is incremental: `stable` is the text of tokens[:n_stable], which ends on a whole
    character, so only the tokens after it are decoded again at each step (byte-level BPE
    decodes a concatenation at a character boundary to the concatenation of the decodes).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...],
                 row: int, on_text: StreamCallback | None) -> None:
        self.decode, self.stop, self.row, self.on_text = decode, stop, row, on_text
        self.longest_stop = max(map(len, stop), default=0)
        self.stable, self.n_stable = "", 0
        self.emitted = 0
        self.text = ""

    def update(self, tokens: list[int], final: bool = False) -> bool:
        """Decode this row's tokens so far; returns True if a stop string appeared."""
        tail = self.decode(tokens[self.n_stable:])
        searched_up_to = len(self.stable)
        self.text = self.stable + tail
        if not tail.endswith("\ufffd"):  # \ufffd: a multi-byte character may be split across tokens
            self.stable, self.n_stable = self.text, len(tokens)
        start = max(0, searched_up_to - self.longest_stop)
        hit = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            final = True
        safe = len(self.text)
        if not final:
            safe = len(self.text.rstrip("\ufffd"))
            head = self.text[:safe]  # hold back a tail that may still grow into a stop string
            safe -= max((n for s in self.stop for n in range(1, min(len(s), safe + 1))
                         if head.endswith(s[:n])), default=0)
        if self.on_text is not None and safe > self.emitted:
            self.on_text(self.row, self.text[self.emitted:safe])
        self.emitted = max(self.emitted, safe)
        return hit >= 0


def generate(backend: Backend, prompts: Sequence[Sequence[int]], params: SamplingParams,
             on_text: StreamCallback | None = None, drafter: Drafter | None = None) -> GenerationResult:
    """Generate for a batch of tokenized prompts (any lengths; they are left-padded together).

    on_text(row, text) streams each row's new text as soon as it is final. drafter: speculative decoding
    (runtime/speculate.py), for one prompt on a backend that verifies_tokens. Raises GenerationError
    for an empty prompt, an out-of-vocabulary id, a prompt that does not fit, or a drafter it cannot use.
    """
    if drafter is not None:
        check_drafter(backend, drafter, len(prompts), params)
    prompts = prepare_prompts(prompts, params, backend)
    tok = backend.tokenizer
    seed = None
    generator = None
    if not params.is_greedy:
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        generator = torch.Generator().manual_seed(seed)

    batch = len(prompts)
    limit = context_limit(backend)[0]
    input_ids, prompt_mask, position_ids = window_inputs(prompts, limit)  # the whole prompts unless sliding
    prompt_len = input_ids.shape[1]
    # the cache holds every fed token (the last new token is never fed back), at most `limit` of them
    total = min(prompt_len + params.max_new_tokens - 1, limit)
    device = backend.device
    attention_mask = torch.ones((batch, total), dtype=torch.long)
    attention_mask[:, :prompt_len] = prompt_mask
    attention_mask = attention_mask.to(device)
    next_pos = position_ids[:, -1:] + 1

    eot = tok.eot_token if params.stop_at_eot else None
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    running = [True] * batch
    watchers = [StopStringScanner(tok.decode, params.stop, i, on_text) for i in range(batch)]
    guides = new_guides(params, tok, batch)
    result = GenerationResult(prompts, tokens, [""] * batch, reasons, seed)

    def take(next_ids: torch.Tensor) -> None:
        for i, t in enumerate(next_ids.tolist()):
            if not running[i]:
                continue
            if t == eot:
                running[i], reasons[i] = False, "eot"
                watchers[i].update(tokens[i], final=True)
                continue
            tokens[i].append(t)
            if guides is not None:
                guides[i].advance(t)
            if watchers[i].update(tokens[i]):
                running[i], reasons[i] = False, "stop"
            elif guides is not None and guides[i].finished:  # the grammar is complete
                running[i], reasons[i] = False, "stop"
                watchers[i].update(tokens[i], final=True)
            elif len(tokens[i]) == params.max_new_tokens:
                running[i] = False
                watchers[i].update(tokens[i], final=True)

    backend.reset(batch, total)
    t0 = time.perf_counter()
    logits = backend.prefill(input_ids.to(device), attention_mask[:, :prompt_len], position_ids.to(device))
    next_ids = sample_next(logits, params, tok.n_vocab, generator, tokens, guides)  # .cpu() inside: synchronises
    result.prefill_ms = (time.perf_counter() - t0) * 1e3
    take(next_ids)

    t0 = time.perf_counter()
    seq = prompt_len
    if drafter is not None:
        drafter.start(prompts[0] + tokens[0])  # the context so far: the prompt and the first token
    while any(running):
        if drafter is not None and seq < total:  # one speculative round (runtime/speculate.py)
            room = min(drafter.k, total - seq - 1, params.max_new_tokens - len(tokens[0]) - 1)
            drafts, q = drafter.propose(prompts[0] + tokens[0], room, params, generator) if room > 0 else ([], None)
            S = 1 + len(drafts)
            ids = torch.tensor([[int(next_ids[0])] + drafts], device=device)
            pos = next_pos.to(device) + torch.arange(S, device=device)
            logits = backend.decode_tokens(ids, attention_mask[:, :seq + S], pos)[0]
            if params.is_greedy:
                new = verify_greedy(logits.cpu(), drafts, tok.n_vocab)
            else:
                new = verify_sampled(logits.cpu(), drafts, q, params, tok.n_vocab, generator)
            kept = len(new) - 1
            backend.trim_right(len(drafts) - kept)
            drafter.accept(drafts, kept, new[-1])
            result.draft_proposed += len(drafts)
            result.draft_accepted += kept
            seq += 1 + kept
            next_pos = next_pos + 1 + kept
            for t in new:
                result.decode_tokens += running[0]
                take(torch.tensor([t]))
            next_ids = torch.tensor([new[-1]])
            continue
        if seq < total:
            seq += 1
            logits = backend.decode_one_token(next_ids[:, None].to(device), attention_mask[:, :seq],
                                              next_pos.to(device))
            next_pos = next_pos + 1
        else:  # the cache is full: only params.sliding_window gets here; re-run each row's last `limit` tokens
            ids, mask, pos = window_inputs([p + t for p, t in zip(prompts, tokens)], limit)
            backend.reset(batch, ids.shape[1])
            logits = backend.prefill(ids.to(device), mask.to(device), pos.to(device))
        next_ids = sample_next(logits, params, tok.n_vocab, generator, tokens, guides)
        result.decode_tokens += sum(running)
        take(next_ids)
    result.decode_s = time.perf_counter() - t0
    result.texts = [w.text for w in watchers]
    return result
