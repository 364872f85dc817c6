"""An OpenAI-compatible HTTP server with continuous batching over any backend.

    python -m runtime.serve --model demo
    python -m runtime.serve --model artifacts/demo --backend onnxruntime --port 8000 --max-batch 16
    python -m runtime.serve --model artifacts/gpt2 --backend tensorrt --api-key "$KEY"

Endpoints: POST /v1/completions (OpenAI's completions API; streaming as server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus text). One scheduler thread owns the backend
and runs every request in one batch (runtime/scheduler.py); requests join and leave it between
steps. It binds 127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C) stops accepting
connections, lets the requests in flight finish (up to --drain-timeout seconds), then exits.
"""

import argparse
import asyncio
import dataclasses
import json
import secrets
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from model.errors import CliParser, ModelError, require_extra, run_cli
from runtime.logprobs import MAX_LOGPROBS, TextOffsets, openai_logprobs
from runtime.loop import GenerationError, SamplingParams, check_prompts
from runtime.open_backend import BACKENDS, add_backend_flags, open_backend
from runtime.sampling import check_logit_bias
from runtime.scheduler import Completion, QueueFull, Scheduler

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_DRAIN_TIMEOUT_S = 120.0
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_CHOICES = 128  # prompts x n in one request
MAX_STOP = 4  # OpenAI allows up to 4 stop strings
DISCONNECT_POLL_S = 0.5  # a non-streaming request checks this often whether its client is still there
RETRY_AFTER_S = 1
FINISH = {"eot": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ApiError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy_error"}.get(self.status, "invalid_request_error" if self.status < 500 else
                                              "server_error")


def error_response(e: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=e.headers)


def completion_request_model():
    """The request body: OpenAI's completions fields, plus top_k, sliding_window and ignore_eos."""
    from pydantic import BaseModel, ConfigDict, Field

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str | list[str] | list[int] | list[list[int]]
        model: str | None = None
        max_tokens: int | None = Field(default=None, ge=0)  # 0: only with echo (score the prompt)
        temperature: float | None = Field(default=None, ge=0, le=100)
        top_p: float | None = Field(default=None, gt=0, le=1)
        top_k: int | None = Field(default=None, ge=-1)  # extension: -1, 0 or null turn it off
        n: int = Field(default=1, ge=1, le=MAX_CHOICES)
        seed: int | None = Field(default=None, ge=0, lt=2**63)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        echo: bool = False
        sliding_window: bool = False  # extension: nanoGPT's sample.py past the context
        ignore_eos: bool = False  # extension: do not stop at the end-of-text token
        logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
        logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's) -> -100..100
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        # structured output: {"type": "json_schema", "json_schema": {"schema": ...}}, {"type": "json_object"},
        # {"type": "text"} (as vLLM and TensorRT-LLM take them on completions); extensions as vLLM names them
        response_format: dict[str, Any] | None = None
        guided_regex: str | None = None
        guided_grammar: str | None = None  # a Lark grammar
        # OpenAI fields this server does not implement: accepted only at their "off" value
        best_of: int | None = None
        suffix: str | None = None
        user: str | None = None

    return CompletionRequest


def tokenizer_request_models():
    """vLLM's /tokenize and /detokenize bodies (text prompts; no chat messages)."""
    from pydantic import BaseModel, ConfigDict

    class TokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str
        model: str | None = None
        add_special_tokens: bool = True  # nothing to add: GPT-2 and char vocabularies have no BOS
        return_token_strs: bool = False

    class DetokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        tokens: list[int]
        model: str | None = None

    return TokenizeRequest, DetokenizeRequest


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    stream_interval: int = 1  # a streamed row's chunk carries up to this many new tokens (its first goes at once);
    # STREAM_INTERVAL_AUTO: ceil(rows in the batch / AUTO_CHUNKS_PER_STEP), see stream_interval_arg


STREAM_INTERVAL_AUTO = 0
AUTO_CHUNKS_PER_STEP = 4


def stream_interval_arg(text: str) -> int:
    """--stream-interval N | auto. auto: a row sends a chunk every ceil(rows / 4) new tokens, so a decode step sends
    about 4 chunks in all whatever the batch: per token at up to 4 rows, fewer, larger chunks in a full batch. Where
    each chunk costs a hop between processes (Ray Serve's replica -> proxy) that cost stops growing with the batch."""
    if text == "auto":
        return STREAM_INTERVAL_AUTO
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'auto', got {text!r}")
    return n


class Metrics:
    """Prometheus metrics (prometheus_client), in a registry of this server's own."""

    def __init__(self, scheduler: Scheduler) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptdeploy_requests", "Completion rows finished, by finish reason "
                                "(eot, stop, length, cancelled, error)", ["finish_reason"], registry=r)
        self.rejected = Counter("gptdeploy_rejected_requests", "Requests refused, by HTTP status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("gptdeploy_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("gptdeploy_generation_tokens", "Tokens generated", registry=r)
        self.batch_rows = Gauge("gptdeploy_batch_rows", "Rows in the running batch now", registry=r)
        self.batch_rows.set_function(lambda: scheduler.active)
        Gauge("gptdeploy_batch_capacity", "Rows the batch can hold (--max-batch)", registry=r).set(scheduler.max_batch)
        self.queue_depth = Gauge("gptdeploy_queue_depth", "Rows waiting to join the batch", registry=r)
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.step_rows = Histogram("gptdeploy_step_batch_rows", "Batch occupancy: rows in each decode step",
                                   buckets=tuple(2**i for i in range(11)), registry=r)
        self.ttft = Histogram("gptdeploy_time_to_first_token_seconds", "From a row's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gptdeploy_inter_token_latency_seconds", "Between consecutive tokens of a row",
                             buckets=ITL_BUCKETS, registry=r)
        scheduler.on_step = self.step_rows.observe


class _EventPump:
    """Hands the scheduler thread's events to the event loop(s) once per batch: `post` only queues, and
    `flush` (a Scheduler.after_events hook: after each admission and each step) wakes each loop once for the
    whole batch. One wake-up per event made the loop thread take the GIL from the scheduler thread once
    per row and step, 16 times a step at batch 16."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, tuple]] = []

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: tuple) -> None:
        with self._lock:
            self._pending.append((loop, queue, event))

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
        for loop, queue, event in batch:
            by_loop.setdefault(loop, []).append((queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class _Bridge:
    """Carries one request's events from the scheduler thread to its handler on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, pump: _EventPump) -> None:
        self.loop, self.metrics, self.pump = loop, metrics, pump
        self.queue: asyncio.Queue[tuple[int, str, bool, int]] = asyncio.Queue()
        self.index: dict[int, int] = {}  # id(completion) -> its choice index
        self.last_token_at: dict[int, float] = {}

    def on_event(self, c: Completion, text: str, done: bool) -> None:  # the scheduler thread
        now, index = time.perf_counter(), self.index[id(c)]
        if done:
            self.metrics.requests.labels(c.finish_reason).inc()
        else:
            self.metrics.generation_tokens.inc()
            last = self.last_token_at.get(index)
            if last is None:
                self.metrics.ttft.observe(now - c.submitted_at)
            else:
                self.metrics.itl.observe(now - last)
            self.last_token_at[index] = now
        # with the row's token count now: the logprobs that go with this text
        self.pump.post(self.loop, self.queue, (index, text, done, len(c.tokens)))

    async def next_events(self) -> list[tuple[int, str, bool, int]]:
        """At least one event, and every other one already there (a slow reader gets them merged)."""
        events = [await self.queue.get()]
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


class _DeclaredBodyLimit:
    """Answers 413 in the API's JSON, before reading anything, to a request whose Content-Length is over
    the limit (Starlette's body limiter, which FastAPI's max_body_size installs, answers those in plain
    text; it still stops a chunked body that grows past the limit, through the app's error handler)."""

    def __init__(self, app: Any, limit: int, on_reject: Any) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from starlette.datastructures import Headers

            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.limit:
                self.on_reject()
                response = error_response(ApiError(413, f"request body of {length} bytes is over the limit of "
                                                        f"{self.limit} (--max-body-bytes)"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(scheduler: Scheduler, config: ServeConfig):
    """The ASGI app: FastAPI routes behind the declared-body-size check."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.sse import EventSourceResponse, format_sse_event
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    backend, tok = scheduler.backend, scheduler.backend.tokenizer
    metrics = Metrics(scheduler)
    pump = _EventPump()
    scheduler.after_events.append(pump.flush)
    CompletionRequest = completion_request_model()
    TokenizeRequest, DetokenizeRequest = tokenizer_request_models()
    state = {"draining": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            state["draining"] = True
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="gptdeploy", lifespan=lifespan, max_body_size=config.max_body_bytes,
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        metrics.rejected.labels(str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc)
        return await _api_error(_request, ApiError(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}",
                                                   param))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return await _api_error(request, ApiError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "backend": backend.name, "rows": scheduler.active, "queue": scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "gptdeploy", "max_model_len": scheduler.limit}]}

    def check_model(name: str | None) -> None:
        if name not in (None, config.model_name):
            raise ApiError(404, f"model {name!r} is not served here; this server serves {config.model_name!r}",
                           "model", "model_not_found")

    # vLLM's tokenizer endpoints: a client (lm-evaluation-harness's remote tokenizer) needs no files of its own
    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(req: TokenizeRequest):  # type: ignore[valid-type]
        check_model(req.model)
        try:
            ids = tok.encode(req.prompt)
        except ModelError as e:  # a character outside a char model's vocabulary
            raise ApiError(400, str(e), "prompt") from None
        return {"count": len(ids), "max_model_len": scheduler.limit, "tokens": ids,
                "token_strs": [tok.decode([t]) for t in ids] if req.return_token_strs else None}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(req: DetokenizeRequest):  # type: ignore[valid-type]
        check_model(req.model)
        try:
            if req.tokens:
                check_prompts([req.tokens], tok.n_vocab)  # ids inside the vocabulary
        except ModelError as e:
            raise ApiError(400, str(e), "tokens") from None
        return {"prompt": tok.decode(req.tokens)}

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def tokenizer_info():
        eot = tok.eot_token
        return {"tokenizer_class": "GPT2BPE" if tok.spec.get("type") == "gpt2" else "CharTokenizer",
                "spec": tok.spec, "vocab_size": tok.n_vocab, "model_max_length": scheduler.limit,
                "eos_token_id": eot, "eos_token": None if eot is None else tok.decode([eot]),
                "bos_token": None, "pad_token": None, "add_bos_token": False}

    def grammar(req: Any) -> Any:
        """The request's structured-output grammar (runtime/structured.py), checked against the vocabulary."""
        fmt = req.response_format or {"type": "text"}
        kind = fmt.get("type")
        asked = [name for name, given in (("response_format", kind != "text"), ("guided_regex", req.guided_regex),
                                          ("guided_grammar", req.guided_grammar)) if given]
        if not asked:
            return None
        if len(asked) > 1:
            raise ApiError(400, f"give one of {', '.join(asked)}, not several", asked[1])
        try:
            require_extra("structured", "llguidance")
            from runtime import structured  # llguidance (the structured extra) only when asked for

            if req.guided_regex is not None:
                g = structured.regex_grammar(req.guided_regex)
            elif req.guided_grammar is not None:
                g = structured.lark_grammar(req.guided_grammar)
            elif kind == "json_object":
                g = structured.json_object_grammar()
            elif kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, (dict, bool)):
                    raise ApiError(400, 'response_format json_schema needs {"json_schema": {"schema": {...}}}',
                                   "response_format")
                g = structured.json_schema_grammar(schema)
            else:
                raise ApiError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                               "response_format")
            structured.new_guide(g, tok)  # an invalid grammar, or one this vocabulary cannot spell: 400 now
        except ModelError as e:
            raise ApiError(400, str(e), asked[0]) from None
        return g

    def sampling_params(req: Any) -> SamplingParams:
        if req.suffix is not None:
            raise ApiError(400, "suffix is not supported by this server", "suffix")
        bias = []
        for key, value in (req.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", "logit_bias")
            bias.append((int(key), value))
        if problem := check_logit_bias(bias, tok.n_vocab):
            raise ApiError(400, problem, "logit_bias")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "best_of other than n is not supported by this server", "best_of")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop strings", "stop")
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 is only allowed with echo (it scores the prompt)", "max_tokens")
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            return SamplingParams(  # max_tokens 0 (score only) runs as 1 that is never sampled
                max_new_tokens=DEFAULT_MAX_TOKENS if req.max_tokens is None else max(req.max_tokens, 1),
                greedy=temperature == 0, temperature=temperature,
                top_k=None if req.top_k in (None, 0, -1) else req.top_k,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(stop),
                stop_at_eot=not req.ignore_eos, sliding_window=req.sliding_window, logit_bias=tuple(sorted(bias)),
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                grammar=grammar(req))
        except GenerationError as e:
            raise ApiError(400, str(e)) from None

    def encode_prompts(req: Any) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = [p]
        else:
            texts = list(p)
        try:
            prompts = [tok.encode(t) if isinstance(t, str) else list(t) for t in texts]
            check_prompts(prompts, tok.n_vocab)
        except ModelError as e:  # GenerationError too: empty prompt, id outside the vocabulary
            raise ApiError(400, str(e), "prompt") from None
        return prompts

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):  # type: ignore[valid-type]
        check_model(req.model)
        params = sampling_params(req)
        prompts = encode_prompts(req)
        longest, new_tokens = max(len(p) for p in prompts), 0 if req.max_tokens == 0 else params.max_new_tokens
        score_prompt = req.echo and req.logprobs is not None
        if score_prompt and not getattr(backend, "all_logits", False):
            raise ApiError(400, f"echo with logprobs needs every prompt position's logits, which the {backend.name} "
                           "backend does not give; serve with --backend torch or an onnxruntime artifact "
                           "exported with --all-logits or --graph ort", "echo")
        if score_prompt and longest > scheduler.limit:
            raise ApiError(400, f"echo with logprobs scores the whole prompt, and it ({longest} tokens) is longer "
                           f"than {scheduler.limit_name}", "prompt", "context_length_exceeded")
        if not params.sliding_window:
            if longest + new_tokens > scheduler.limit:
                raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({new_tokens}) = "
                               f"{longest + new_tokens} exceeds {scheduler.limit_name}; lower max_tokens, "
                               'shorten the prompt, or send "sliding_window": true to condition each token on the '
                               f"last {scheduler.limit} tokens as nanoGPT's sample.py does", "max_tokens",
                               "context_length_exceeded")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_CHOICES} completions", "n")
        bridge = _Bridge(asyncio.get_running_loop(), metrics, pump)
        rows: list[Completion] = []  # choice k = prompt k // n, sample k % n (OpenAI's order)
        for prompt in prompts:
            for j in range(req.n):
                seed = None if params.seed is None else params.seed + j  # sample j: seed + j, as the CLI's samples
                c = Completion(prompt, dataclasses.replace(params, seed=seed), on_event=bridge.on_event,
                               logprobs=req.logprobs, score_prompt=score_prompt, score_only=req.max_tokens == 0)
                bridge.index[id(c)] = len(rows)
                rows.append(c)
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            scheduler.submit(rows)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        metrics.prompt_tokens.inc(sum(len(c.prompt) for c in rows))
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": config.model_name}
        echo = [tok.decode(prompts[k // req.n]) if req.echo else "" for k in range(len(rows))]
        lp_sent = [0] * len(rows)  # new tokens whose log-probabilities were sent
        offsets = [TextOffsets(tok.decode, len(echo[k])) for k in range(len(rows))]

        def logprobs(k: int, end: int, with_prompt: bool) -> dict | None:
            """Row k's logprobs from its last part sent up to new token `end` (the prompt's first, if echoed)."""
            if req.logprobs is None:
                return None
            c, start = rows[k], lp_sent[k]
            tokens, entries = c.tokens[start:end], c.token_logprobs[start:end]
            offs = [offsets[k].offset(c.tokens, i) for i in range(start, end)]
            lp_sent[k] = end
            if with_prompt and req.echo:
                at = TextOffsets(tok.decode)
                offs = [at.offset(c.prompt, i) for i in range(len(c.prompt))] + offs
                tokens, entries = c.prompt + tokens, c.prompt_logprobs + entries
            return openai_logprobs(tok.decode, tokens, entries, offs)
        usage = {"prompt_tokens": sum(len(p) for p in prompts)}

        def final_usage() -> dict[str, int]:
            done = sum(len(c.tokens) for c in rows)
            return {**usage, "completion_tokens": done, "total_tokens": usage["prompt_tokens"] + done}

        def failure() -> ApiError | None:
            failed = [c for c in rows if c.finish_reason in ("error", "cancelled")]
            if not failed:
                return None
            c = failed[0]
            if c.finish_reason == "cancelled":
                return ApiError(503, "the server shut down before this request finished",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
            return ApiError(500, f"generation failed: {c.error}")

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def events():
                # one chunk per row per write: a row's tokens that are ready together (a slow reader, or
                # --stream-interval N holding a row until N tokens are new) leave as one chunk
                n_rows = len(rows)
                sent, held, unsent = [0] * n_rows, [""] * n_rows, [0] * n_rows  # chars sent, text and tokens held
                chunks_sent, ended, last_n, open_rows = [0] * n_rows, [False] * n_rows, [0] * n_rows, n_rows
                try:
                    while open_rows:
                        chunks, touched = [], {}
                        for k, text, done, n_tokens in await bridge.next_events():
                            if req.echo and not chunks_sent[k]:
                                # after the prefill: the prompt's logprobs are known
                                chunks.append({**head, "choices": [_choice(k, echo[k], None, logprobs(k, 0, True))]})
                                chunks_sent[k] += 1
                            touched[k], last_n[k] = None, n_tokens
                            if done:
                                open_rows, ended[k] = open_rows - 1, True
                            else:
                                held[k], unsent[k] = held[k] + text, unsent[k] + 1
                        interval = config.stream_interval or -(-scheduler.active // AUTO_CHUNKS_PER_STEP)
                        for k in touched:
                            c = rows[k]
                            if ended[k]:
                                if c.finish_reason not in FINISH:  # error or cancelled: reported below
                                    continue
                                text, finish = c.text[sent[k]:], FINISH[c.finish_reason]  # what the last token released
                            elif chunks_sent[k] == int(req.echo) or unsent[k] >= interval:
                                text, finish = held[k], None  # a row's first text goes at once
                            else:
                                continue
                            if finish is None and not text and req.logprobs is None:
                                continue
                            sent[k], held[k], unsent[k], chunks_sent[k] = sent[k] + len(text), "", 0, chunks_sent[k] + 1
                            lp = logprobs(k, last_n[k], False)
                            chunks.append({**head, "choices": [_choice(k, text, finish, lp)]})
                        if chunks:
                            yield b"".join(map(_sse, chunks))
                    e = failure()
                    if e is None:
                        if include_usage:  # OpenAI sends it only when asked: clients index choices[0]
                            yield _sse({**head, "choices": [], "usage": final_usage()})
                    else:
                        yield _sse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}})
                    yield format_sse_event(data_str="[DONE]")
                finally:  # the client went away (or the stream ended): rows still running stop at once
                    for c in rows:
                        if c.finish_reason is None:
                            c.cancel()

            return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        open_rows = len(rows)
        try:
            while open_rows:
                try:
                    events = await asyncio.wait_for(bridge.next_events(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the rows are cancelled below
                    continue
                open_rows -= sum(1 for _, _, done, _ in events if done)
        finally:
            for c in rows:
                if c.finish_reason is None:
                    c.cancel()
        e = failure()
        if e is not None:
            raise e
        return {**head, "choices": [_choice(k, echo[k] + c.text, FINISH[c.finish_reason],
                                            logprobs(k, len(c.tokens), True)) for k, c in enumerate(rows)],
                "usage": final_usage()}

    return _DeclaredBodyLimit(app, config.max_body_bytes, metrics.rejected.labels("413").inc)


def _choice(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _sse(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON body (fastapi.sse's encoder)."""
    from fastapi.sse import format_sse_event

    return format_sse_event(data_str=json.dumps(body, separators=(",", ":")))


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m runtime.serve", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", metavar="SRC_OR_DIR",
                   help="what runtime.generate's --model takes: an artifact folder, or for --backend torch also "
                        "demo, a HF GPT-2 folder, a nanoGPT ckpt.pt (default: %(default)s)")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="%(choices)s (default: %(default)s)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind; 0.0.0.0 exposes the server to the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help="rows decoded together; more requests wait in the queue (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help="rows that may wait; beyond it requests get 503 + Retry-After (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: none; /health and /metrics stay open)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id in /v1/models and responses (default: the --model folder's name)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--stream-interval", type=stream_interval_arg, default="1", metavar="N|auto",
                   help="send a streaming row's text every N new tokens (its first token and its end at once): "
                        "fewer, larger SSE chunks cost the server and clients less per token; auto: every "
                        f"ceil(rows in the batch / {AUTO_CHUNKS_PER_STEP}) tokens (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM, wait at most this long for requests in flight (default: %(default)s)")
    add_backend_flags(p)
    p.add_argument("--access-log", action="store_true", help="log every request line (default: off)")
    return p


SERVE_MODULES = ("fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client")  # the "serve" extra


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_extra("serve", *SERVE_MODULES)
    if not 0 <= args.port <= 65535:
        raise ModelError(f"--port must be in 0..65535, got {args.port}")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-body-bytes", args.max_body_bytes, 1024)):
        if value < low:
            raise ModelError(f"{flag} must be >= {low}, got {value}")
    if not args.drain_timeout > 0:
        raise ModelError(f"--drain-timeout must be > 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ModelError("--api-key must not be empty")
    import uvicorn

    backend = open_backend(args.backend, args.model, device=args.device, provider=args.provider,
                           threads=args.threads)
    scheduler = Scheduler(backend, args.max_batch, args.max_queue)
    name = args.served_model_name or (args.model.rstrip("/").rsplit("/", 1)[-1] or args.model)
    app = create_app(scheduler, ServeConfig(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                                               stream_interval=args.stream_interval))
    print(f"serving {name!r} on {backend.name}: http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
          f"context {scheduler.limit})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log,
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler it found: make that
    # a no-op, so a drained server exits 0 (a second Ctrl-C still forces uvicorn's own quick exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    run_cli(main)

