"""runtime.serve's OpenAI server scaled out on Ray Serve: N replicas, each one backend + one Scheduler.

    python -m runtime.ray_serve --model artifacts/demo --backend onnxruntime --replicas 2
    python -m runtime.ray_serve --model artifacts/demo --backend onnxruntime --min-replicas 1 --max-replicas 4
    python -m runtime.ray_serve --address auto ...                  # join a running cluster (ray start --head)
    python -m runtime.ray_serve --write-config app.yaml ...         # a config for `serve deploy app.yaml`

Each replica (a Ray actor) opens the backend, checks the artifact's file hashes and that its config.json is the
one the deploying machine saw, and serves runtime.serve's FastAPI app (the same routes, errors and continuous
batching: no Ray batching) behind Ray's HTTP proxy, which spreads requests over the replicas. Every response
names its replica in the X-Gptdeploy-Replica header. max_ongoing_requests = --max-batch, so a replica never
holds more requests than it batches; the overflow waits in Ray's router (up to --max-queue, then 503).
Autoscaling (--min/--max-replicas) targets --max-batch ongoing requests per replica. Without --address a
local Ray instance is started and shut down on exit. The artifact path must exist on every node (docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.artifact import CONFIG_FILE, is_artifact, read_artifact
from model.errors import ModelError, run_cli
from runtime import serve as http
from runtime.open_backend import open_backend
from runtime.scheduler import Scheduler

APP_NAME = "gptdeploy"
DEPLOYMENT_NAME = "gptdeploy"
REPLICA_HEADER = "x-gptdeploy-replica"
UPSCALE_DELAY_S = 5.0
DOWNSCALE_DELAY_S = 60.0
# how often a replica copies its Prometheus samples into Ray's metrics: Ray's metrics agent drops a gauge not set
# again within 2 of its report intervals (RAY_metrics_report_interval_ms, 10 s by default), so keep it shorter
METRICS_EXPORT_S = 2.0
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # Ray reads it when a proxy starts
PROXY_CALLBACK = "runtime.ray_serve:proxy_middlewares"
# Ray Serve's request-path settings that its RAY_SERVE_THROUGHPUT_OPTIMIZED=1 bundle turns on, less direct ingress
# (which drops the proxy, and with it our JSON errors): the replica runs our app on its own event loop, the proxy's
# router on the proxy's, proxy -> replica over gRPC, access logs buffered, garbage collection frozen after start.
# Measured on the load test: 1 replica 234.6 -> 274.6 tokens/s (docs/serving.md). Every node needs them (ray start).
THROUGHPUT_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                  "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
                  "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"}


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica needs to open its backend and app: plain values, so that it goes through
    Deployment.bind() and a serve config's `args` alike."""

    model: str
    backend: str = "torch"
    device: str | None = None
    provider: str | None = None
    threads: int | None = None
    max_batch: int = http.DEFAULT_MAX_BATCH
    max_queue: int = http.DEFAULT_MAX_QUEUE
    api_key: str | None = None
    served_model_name: str | None = None
    max_body_bytes: int = http.DEFAULT_MAX_BODY_BYTES
    stream_interval: int = http.STREAM_INTERVAL_AUTO  # each chunk is a hop replica -> proxy: fewer in a full batch
    artifact_sha256: str | None = None  # config.json's sha256 as the deploying machine read it

    @property
    def model_name(self) -> str:
        return self.served_model_name or (self.model.rstrip("/").rsplit("/", 1)[-1] or self.model)


def artifact_digest(model: str) -> str | None:
    """sha256 of the artifact's config.json (which lists every file's sha256), None if model is no artifact."""
    path = Path(model)
    if not (path.is_dir() and is_artifact(path)):
        return None
    return hashlib.sha256((path / CONFIG_FILE).read_bytes()).hexdigest()


def check_artifact(spec: ReplicaSpec) -> None:
    """On a replica, before it takes traffic: every file matches config.json's sha256, and config.json is
    the one the deploying machine saw (a stale or different copy at the same path on this node is refused)."""
    if spec.artifact_sha256 is None:
        return
    path = Path(spec.model)
    if not path.is_dir():
        raise ModelError(f"{spec.model}: no such artifact folder on this node (every node needs it at that path)")
    read_artifact(path, verify=True)
    here = artifact_digest(spec.model)
    if here != spec.artifact_sha256:
        raise ModelError(f"{spec.model}: config.json on this node (sha256 {here}) is not the one deployed "
                         f"({spec.artifact_sha256})")


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries the replica's id."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class JsonErrors:
    """ASGI middleware for Ray's HTTP proxy: the proxy's own failures in the API's JSON. A replica that dies
    mid-request leaves the proxy with no response (uvicorn would answer a plain-text 500) or a cut stream;
    Ray's 503 (backpressure, no replica) and 408 are plain text. A cut event stream gets an error event and
    [DONE], as runtime.serve ends a stream whose rows failed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state: dict[str, Any] = {"started": False, "ended": False, "stream": False, "rewrite": None}

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                kind = headers.get(b"content-type", b"")
                state["started"], state["stream"] = True, kind.startswith(b"text/event-stream")
                if message["status"] >= 400 and not kind.startswith(b"application/json"):
                    state["rewrite"] = (message, [])  # Ray's own text error: re-sent as JSON below
                    return
            elif message["type"] == "http.response.body":
                state["ended"] = not message.get("more_body", False)
                if state["rewrite"] is not None:
                    start, body = state["rewrite"]
                    body.append(message.get("body", b""))
                    if state["ended"]:
                        headers = [(k, v) for k, v in start.get("headers", [])
                                   if k.lower() not in (b"content-type", b"content-length")]
                        if start["status"] == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                            headers.append((b"retry-after", str(http.RETRY_AFTER_S).encode()))  # as runtime.serve's
                        await _send_json_error(send, start["status"], b"".join(body).decode(errors="replace"),
                                               headers)
                    return
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        finally:
            if not state["started"]:
                await _send_json_error(send, 500, "the replica serving this request failed; retry")
            elif state["stream"] and not state["ended"]:
                error = {"error": {"message": "the replica serving this request failed mid-stream; retry",
                                   "type": "server_error", "param": None, "code": None}}
                await send({"type": "http.response.body", "body": http._sse(error) + b"data: [DONE]\n\n",
                            "more_body": False})


async def _send_json_error(send: Any, status: int, message: str, headers: list | None = None) -> None:
    kind = http.ApiError(status, message).kind
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or []), (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def scrape(app: Any, path: str = "/metrics") -> str:
    """GET path from an ASGI app in this process (no socket): the replica reads its own Prometheus text."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    body: list[bytes] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    return b"".join(body).decode()


class RayMetrics:
    """The replica's Prometheus samples (runtime.serve's /metrics) copied into Ray's metrics every export(),
    as ray.serve.metrics gauges, which Ray tags with the application, deployment and replica: they leave
    through each node's metrics export port as ray_gptdeploy_*, beside Ray Serve's own ray_serve_*."""

    def __init__(self) -> None:
        self.gauges: dict[str, Any] = {}

    def export(self, text: str) -> int:
        from prometheus_client.parser import text_string_to_metric_families
        from ray.serve.metrics import Gauge

        n = 0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps: nothing to chart
                    continue
                gauge = self.gauges.get(sample.name)
                if gauge is None:
                    gauge = self.gauges[sample.name] = Gauge(sample.name, description=family.documentation,
                                                             tag_keys=tuple(sorted(sample.labels)))
                gauge.set(sample.value, tags=dict(sample.labels) or None)
                n += 1
        return n


def proxy_middlewares() -> list:
    """Ray's proxy calls this at start when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it (local_ray_env)."""
    from starlette.middleware import Middleware

    return [Middleware(JsonErrors)]


def _replica_class():
    from ray import serve

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress()
    class GptReplica:
        """One Ray Serve replica: one backend, one Scheduler, runtime.serve's app (built on the replica)."""

        def __init__(self, spec: dict[str, Any]) -> None:
            self.spec = s = ReplicaSpec(**spec)
            check_artifact(s)
            backend = open_backend(s.backend, s.model, device=s.device, provider=s.provider, threads=s.threads)
            self.scheduler = Scheduler(backend, s.max_batch, s.max_queue)
            self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
            self.metrics_task: asyncio.Task | None = None

        def __serve_build_asgi_app__(self) -> Any:
            s = self.spec
            app = http.create_app(self.scheduler, http.ServeConfig(model_name=s.model_name, api_key=s.api_key,
                                                                   max_body_bytes=s.max_body_bytes,
                                                                   stream_interval=s.stream_interval))
            self.metrics_task = asyncio.get_running_loop().create_task(self._export_metrics(app))
            return ReplicaHeader(app, self.replica_id)

        async def _export_metrics(self, app: Any) -> None:
            ray_metrics, warned = RayMetrics(), False
            while True:
                try:
                    ray_metrics.export(await scrape(app))
                except Exception as e:  # metrics must never take the replica down; say so once in its log
                    if not warned:
                        logging.getLogger("ray.serve").warning("gptdeploy metrics export failed: %r", e)
                        warned = True
                await asyncio.sleep(METRICS_EXPORT_S)

        def check_health(self) -> None:  # Ray restarts a replica whose scheduler thread has died
            thread = getattr(self.scheduler, "_thread", None)
            if thread is not None and not thread.is_alive():
                raise RuntimeError("the scheduler thread has stopped")

    return GptReplica


_REPLICA = None


def replica_class():
    """The deployment class, made once per process (it needs ray, the `cluster` extra)."""
    global _REPLICA
    if _REPLICA is None:
        _REPLICA = _replica_class()
    return _REPLICA


def deployment_options(spec: ReplicaSpec, *, replicas: int | None = 1, min_replicas: int | None = None,
                       max_replicas: int | None = None, num_cpus: float = 1.0,
                       drain_timeout: float = http.DEFAULT_DRAIN_TIMEOUT_S) -> dict[str, Any]:
    """Ray Serve deployment options from the server's flags: a replica takes at most --max-batch requests
    (its batch); more wait in Ray's router (at most --max-queue in each proxy, then 503); the
    autoscaler aims at --max-batch ongoing requests per replica (a full batch) between min and max."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME, "max_ongoing_requests": spec.max_batch, "max_queued_requests": spec.max_queue,
        "ray_actor_options": {"num_cpus": num_cpus}, "graceful_shutdown_timeout_s": drain_timeout,
        "health_check_period_s": 5.0}
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, 1) if max_replicas is None else max_replicas
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": spec.max_batch,
                                         "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S}
    else:
        options["num_replicas"] = replicas
    return options


def build_app(spec: ReplicaSpec, options: dict[str, Any]):
    """The Serve application: the replica deployment with these options, bound to the spec."""
    return replica_class().options(**options).bind(dataclasses.asdict(spec))


def app_builder(args: dict[str, Any]):
    """`import_path: runtime.ray_serve:app_builder` in a serve config; `args` are ReplicaSpec's fields (the
    deployment's options come from the config's `deployments` section)."""
    return replica_class().bind(dataclasses.asdict(ReplicaSpec(**args)))


def serve_config(spec: ReplicaSpec, options: dict[str, Any], host: str, port: int) -> dict[str, Any]:
    """A config for `serve deploy`: the same application, args and deployment options as the command."""
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "runtime.ray_serve:app_builder",
                              "args": dataclasses.asdict(spec), "deployments": [dict(options)]}]}


def write_config(path: Path, config: dict[str, Any]) -> None:
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    if not path.parent.is_dir():
        raise ModelError(f"{path}: parent folder does not exist")
    node_env = {PROXY_CALLBACK_ENV: PROXY_CALLBACK, **THROUGHPUT_ENV}
    tmp.write_text("# serve deploy this file on a cluster whose nodes were started (ray start) with this environment\n"
                   "# (docs/serving.md):\n" + "".join(f"#   {k}={v}\n" for k, v in node_env.items())
                   + "# args.stream_interval 0 is --stream-interval auto (a chunk every ceil(rows / 4) tokens)\n"
                   + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = http.build_parser()
    p.prog = "python -m runtime.ray_serve"
    p.set_defaults(stream_interval="auto")  # every chunk crosses from the replica to Ray's proxy (docs/serving.md)
    p.description = __doc__
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--replicas", type=int, default=None, metavar="N", help="fixed replica count (default: 1)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="A", help="autoscale from A replicas ...")
    g.add_argument("--max-replicas", type=int, default=None, metavar="B", help="... to B")
    g.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                   help="join this Ray cluster (default: start a local Ray instance)")
    g.add_argument("--num-cpus", type=float, default=None, metavar="N",
                   help="Ray CPUs each replica reserves (default: --threads, or 1)")
    g.add_argument("--write-config", type=Path, default=None, metavar="YAML",
                   help="write a `serve deploy` config for these flags and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if autoscale and args.replicas is not None:
        raise ModelError("--replicas is a fixed count; give it or --min-replicas/--max-replicas, not both")
    for flag, value, low in (("--replicas", args.replicas, 1), ("--min-replicas", args.min_replicas, 0),
                             ("--max-replicas", args.max_replicas, 1), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 1), ("--port", args.port, 0)):
        if value is not None and value < low:
            raise ModelError(f"{flag} must be >= {low}, got {value}")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise ModelError(f"--min-replicas {args.min_replicas} is above --max-replicas {args.max_replicas}")
    if args.num_cpus is not None and not args.num_cpus > 0:
        raise ModelError(f"--num-cpus must be > 0, got {args.num_cpus}")
    if args.api_key is not None and not args.api_key.strip():
        raise ModelError("--api-key must not be empty")
    if args.access_log:
        raise ModelError("--access-log is runtime.serve's; Ray Serve logs every request itself "
                         "(/tmp/ray/session_latest/logs/serve/ on each node)")
    model = args.model
    if Path(model).is_dir():
        model = str(Path(model).resolve())  # replicas may run elsewhere: an absolute path
    spec = ReplicaSpec(model=model, backend=args.backend, device=args.device, provider=args.provider,
                       threads=args.threads, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                       served_model_name=args.served_model_name or args.model.rstrip("/").rsplit("/", 1)[-1] or None,
                       max_body_bytes=args.max_body_bytes, stream_interval=args.stream_interval,
                       artifact_sha256=artifact_digest(model))
    options = deployment_options(spec, replicas=args.replicas or 1, min_replicas=args.min_replicas,
                                 max_replicas=args.max_replicas, num_cpus=args.num_cpus or args.threads or 1,
                                 drain_timeout=args.drain_timeout)
    if args.write_config is not None:
        write_config(args.write_config, serve_config(spec, options, args.host, args.port))
        print(f"wrote {args.write_config}: serve deploy {args.write_config}", file=sys.stderr)
        return 0
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ModelError('Ray Serve is not installed: pip install -e ".[cluster]"') from None

    if args.address is None:  # the local instance's processes inherit this environment
        os.environ.update(local_ray_env())
    ray.init(address=args.address, namespace=APP_NAME, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(spec, options), name=APP_NAME, route_prefix="/")
    print(f"serving {spec.model_name!r} on Ray Serve ({args.backend}): http://{args.host}:{args.port}/v1 "
          f"({_replica_text(options)}, max batch {args.max_batch} each); Ctrl-C stops it", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if args.address is None:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)
    return 0


def local_ray_env() -> dict[str, str]:
    """The environment a Ray node needs for this server: workers import this checkout (as this process does),
    the proxy answers its own errors in JSON, and the request path's throughput settings. `ray start` on each
    node of a cluster takes all but the first."""
    root = str(Path(__file__).resolve().parent.parent)
    return {"PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
            PROXY_CALLBACK_ENV: PROXY_CALLBACK, **THROUGHPUT_ENV}


def _replica_text(options: dict[str, Any]) -> str:
    a = options.get("autoscaling_config")
    if a:
        return f"{a['min_replicas']}..{a['max_replicas']} replicas, autoscaling at {a['target_ongoing_requests']} " \
               "ongoing requests each"
    return f"{options['num_replicas']} replica{'s' if options['num_replicas'] != 1 else ''}"


if __name__ == "__main__":
    run_cli(main)
