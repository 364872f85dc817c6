"""runtime.ray_serve on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one module-wide),
driven through Ray's HTTP proxy on a free 127.0.0.1 port with the official `openai` client and plain HTTP:
parity with runtime.generate on the same artifact across 2 replicas on 2 nodes, the OpenAI surface, replica
failover under load, autoscaling. Every wait and request here is bounded in time."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import free_loopback_port, server_token_count
from model.errors import ModelError
from runtime import ray_serve as rs
from runtime.loop import SamplingParams, generate
from runtime.open_backend import open_backend

ray = pytest.importorskip("ray", reason="Ray Serve is the `cluster` extra: pip install -e '.[cluster]'")
serve = pytest.importorskip("ray.serve")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "ray-key-123"
TIMEOUT_S = 60  # any one request
WAIT_S = 90  # any one change of the cluster's state
PROMPTS = ["ROMEO:\n", "KING HENRY VI:\nO God! methinks it were a happy life,", "A", "JULIET:\n",
           "First Citizen:\nBefore we proceed any further, hear me speak.\n", "MENENIUS:\nWhy, masters,"]
# Ray's autoscaling metrics every 0.5 s instead of 10 s, so that a burst is seen within seconds
# and every node's metrics export every 2 s instead of 10 s (no shorter than the replicas' METRICS_EXPORT_S)
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_metrics_report_interval_ms": "2000",
                # the one proxy (below) spreads requests over both nodes' replicas, not its own node's first
                "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, each with one `replica_slot`: a replica takes one, so 2 replicas = 2 nodes."""
    env = {**rs.local_ray_env(), **FAST_METRICS}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes' processes inherit it
    node = dict(num_cpus=2, resources={"replica_slot": 1})
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    ray.init(address=c.address, log_to_driver=False)
    port = free_loopback_port()
    # one proxy: both nodes are this machine, and Ray's default of a proxy per node would put two on one port
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spec_for(demo_onnx, max_batch: int) -> rs.ReplicaSpec:
    return rs.ReplicaSpec(model=str(demo_onnx), backend="onnxruntime", threads=1, max_batch=max_batch, api_key=KEY,
                          served_model_name="demo", artifact_sha256=rs.artifact_digest(str(demo_onnx)))


def one_per_node(options: dict) -> dict:
    return {**options, "ray_actor_options": {"num_cpus": 0.5, "resources": {"replica_slot": 1}}}


def deploy(spec: rs.ReplicaSpec, options: dict) -> None:
    serve.run(rs.build_app(spec, options), name=rs.APP_NAME, route_prefix="/")


def replica_states() -> dict[str, int]:
    return dict(serve.status().applications[rs.APP_NAME].deployments[rs.DEPLOYMENT_NAME].replica_states)


def running_replicas() -> int:
    return replica_states().get("RUNNING", 0)


def wait_for(predicate, what: str, timeout: float = WAIT_S) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture(scope="module")
def two_replicas(cluster, demo_onnx):
    deploy(spec_for(demo_onnx, 4), one_per_node(rs.deployment_options(spec_for(demo_onnx, 4), replicas=2)))
    return cluster


@pytest.fixture(scope="module")
def cli_backend(demo_onnx):
    return open_backend("onnxruntime", str(demo_onnx), threads=1)


def cli_text(backend, prompt: str, n: int) -> str:
    """What runtime.generate gives for this prompt alone, greedy."""
    return generate(backend, [backend.tokenizer.encode(prompt)], SamplingParams(max_new_tokens=n, greedy=True)).texts[0]


def test_two_replicas_on_two_nodes_return_the_cli_tokens(two_replicas, cli_backend):
    assert running_replicas() == 2
    assert ray.cluster_resources()["replica_slot"] == 2 and ray.available_resources().get("replica_slot", 0) == 0
    client = openai.OpenAI(base_url=two_replicas + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)
    jobs = [(p, n, i % 2 == 0) for i, (p, n) in enumerate(zip(PROMPTS * 2, (100, 60, 110, 45, 60, 75) * 2))]

    def run(job) -> tuple[str, str]:
        prompt, n, stream = job
        raw = client.completions.with_raw_response.create(model="demo", prompt=prompt, max_tokens=n, temperature=0,
                                                          stream=stream)
        r = raw.parse()
        text = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
        return text, raw.headers[rs.REPLICA_HEADER]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs, timeout=2 * TIMEOUT_S))
    for (prompt, n, _), (text, _) in zip(jobs, results):
        assert text == cli_text(cli_backend, prompt, n), prompt
    replicas = {r for _, r in results}
    print(f"\n{len(jobs)} concurrent requests, served by {sorted(replicas)}")
    assert len(replicas) == 2


def test_openai_surface_through_the_proxy(two_replicas):
    url = two_replicas
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)
    assert [m.id for m in client.models.list().data] == ["demo"]
    r = httpx.get(url + "/health", timeout=TIMEOUT_S)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.headers[rs.REPLICA_HEADER]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT_S).models.list()
    for kwargs, status, fragment in ((dict(max_tokens=200), 400, "sliding_window"),
                                     (dict(model="gpt-4"), 404, "not served here"),
                                     (dict(extra_body={"unknown_field": 1}), 400, "unknown_field")):
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(**(dict(model="demo", prompt="ROMEO:\n", max_tokens=10) | kwargs))
        assert e.value.status_code == status and fragment in e.value.body["message"]
    big = json.dumps({"model": "demo", "prompt": "a" * (2 << 20), "max_tokens": 1})
    r = httpx.post(url + "/v1/completions", content=big, timeout=TIMEOUT_S,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S,
                      json={"prompt": "A", "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as s:
        lines = [x for x in s.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 12
    r = httpx.get(url + "/metrics", timeout=TIMEOUT_S)  # the answering replica's own registry
    assert r.status_code == 200 and "gptdeploy_batch_capacity 4.0" in r.text


def test_replica_metrics_leave_through_each_nodes_metrics_export(two_replicas):
    """Each replica's gptdeploy_* samples, tagged with its replica id, and Ray Serve's own ray_serve_*, on the
    Prometheus endpoint of each node's metrics agent (ray start --metrics-export-port); the token counters there
    add up to the replicas' own."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes]

    def scraped() -> str:
        return "".join(httpx.get(u, timeout=TIMEOUT_S).text for u in urls)

    def tokens_by_replica() -> dict[str, float]:
        out = {}
        for family in text_string_to_metric_families(scraped()):
            for x in family.samples:
                if x.name == "ray_gptdeploy_generation_tokens_total":
                    out[x.labels["replica"]] = x.value
        return out

    names = ("ray_gptdeploy_batch_capacity", "ray_gptdeploy_time_to_first_token_seconds_bucket",
             "ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy",
             "ray_serve_replica_processing_queries")
    seen: dict[str, float] = {}
    own = server_token_count(two_replicas, replicas=2)  # the replicas' own counters, through the proxy
    def complete() -> bool:
        seen.clear()
        seen.update(tokens_by_replica())
        return (len(seen) == 2 and all(v > 0 for v in seen.values()) and all(x in scraped() for x in names)
                and sum(seen.values()) == own)

    try:
        wait_for(complete, "both replicas' token counters and Ray Serve's own metrics", timeout=60)
    except AssertionError:
        text = scraped()
        there = sorted({x.split("{")[0] for x in text.splitlines() if x.startswith("ray_serve")})
        raise AssertionError(f"Ray's token counters {seen} (the replicas' own: {own}); missing "
                             f"{[x for x in names if x not in text]}; Ray Serve's there: {there}") from None
    print(f"\ngeneration tokens by replica in Ray's metrics: {seen}; the replicas' own counters: {own}")
    for _ in range(5):  # over longer than a replica's export period: both series stay (no flickering)
        time.sleep(1)
        assert len(tokens_by_replica()) == 2


class Load:
    """Clients sending greedy requests back to back (every other one streaming), sorting each outcome:
    completed (the CLI's text), failed (a 5xx with a JSON error body, or a stream ended by a JSON error
    event and [DONE]) or lost (anything else: a timeout, a cut connection, a wrong text, another error)."""

    def __init__(self, url: str, expected: dict[tuple[str, int], str], clients: int) -> None:
        self.url, self.expected, self.clients = url, expected, clients
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.completed = self.failed = self.lost = 0
        self.replicas: list[tuple[float, str]] = []  # (time, replica) of each completed request
        self.lost_reasons: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2 * TIMEOUT_S)
        assert not any(t.is_alive() for t in self.threads), "a client hung past its timeout"

    def _client(self, i: int) -> None:
        jobs = list(self.expected)
        with httpx.Client(timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {KEY}"}) as http:
            k = i
            while not self.stop.is_set():
                prompt, n = jobs[k % len(jobs)]
                outcome, replica = self._one(http, prompt, n, stream=k % 2 == 1)
                with self.lock:
                    if outcome == "completed":
                        self.completed += 1
                        self.replicas.append((time.monotonic(), replica))
                    elif outcome == "failed":
                        self.failed += 1
                    else:
                        self.lost += 1
                        self.lost_reasons.append(outcome)
                k += 1

    def _one(self, http: httpx.Client, prompt: str, n: int, stream: bool) -> tuple[str, str]:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
        want = self.expected[(prompt, n)]
        try:
            if not stream:
                r = http.post(self.url + "/v1/completions", json=body)
                if r.status_code >= 500:
                    return ("failed" if "message" in r.json()["error"] else f"5xx {r.text[:80]}"), ""
                if r.status_code != 200:
                    return f"status {r.status_code}", ""
                text = r.json()["choices"][0]["text"]
                return ("completed" if text == want else f"wrong text {text!r}"), r.headers[rs.REPLICA_HEADER]
            with http.stream("POST", self.url + "/v1/completions", json=body) as r:
                if r.status_code >= 500:
                    r.read()
                    return ("failed" if "message" in r.json()["error"] else f"5xx {r.text[:80]}"), ""
                lines = [x for x in r.iter_lines() if x]
            if lines[-1:] != ["data: [DONE]"]:
                return f"stream cut after {len(lines)} events", ""
            events = [json.loads(x[6:]) for x in lines[:-1]]
            if "error" in events[-1]:
                return "failed", ""
            text = "".join(c["text"] for e in events for c in e["choices"])
            return ("completed" if text == want else f"wrong text {text!r}"), r.headers[rs.REPLICA_HEADER]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return f"{type(e).__name__}: {e}", ""

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"completed": self.completed, "failed": self.failed, "lost": self.lost}


@pytest.mark.slow
def test_failover_kill_a_replica_under_load(two_replicas, cli_backend):
    expected = {(p, n): cli_text(cli_backend, p, n) for p, n in zip(PROMPTS, (60, 40, 70, 50, 45, 65))}
    with Load(two_replicas, expected, clients=6) as load:
        wait_for(lambda: load.counts()["completed"] >= 6, "steady load")
        before = {r for _, r in load.replicas}
        victim = load.replicas[-1][1]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        at_kill = load.counts()
        # whole again: 2 replicas running, and a new one (neither the victim nor the survivor) has answered
        recovered = wait_for(lambda: running_replicas() == 2 and any(
            t > killed_at and r not in before for t, r in load.replicas), "a replacement replica serving")
        after_recovery = load.counts()["completed"]
        wait_for(lambda: load.counts()["completed"] >= after_recovery + 6, "load after recovery")
    counts = load.counts()
    print(f"\nfailover: killed {victim} after {at_kill['completed']} completed; replacement serving after "
          f"{recovered:.1f}s; totals {counts}")
    assert counts["lost"] == 0, load.lost_reasons[:5]
    assert counts["completed"] > after_recovery
    assert victim not in {r for t, r in load.replicas if t > killed_at + recovered}


@pytest.mark.slow
def test_autoscaling_burst_up_then_back_down(cluster, demo_onnx, cli_backend):
    serve.delete(rs.APP_NAME)
    spec = spec_for(demo_onnx, 2)
    options = one_per_node(rs.deployment_options(spec, min_replicas=1, max_replicas=2))
    options["autoscaling_config"] |= {"upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0}
    deploy(spec, options)
    assert running_replicas() == 1
    trace: list[tuple[float, int, int, int]] = []  # (s since the burst, replicas running, starting, completed)
    expected = {(p, 110): cli_text(cli_backend, p, 110) for p in ("ROMEO:\n", "A", "JULIET:\n")}
    start = time.monotonic()

    def sample(load: Load | None) -> int:
        states = replica_states()
        n = states.get("RUNNING", 0)
        done = load.counts()["completed"] if load else -1
        row = (round(time.monotonic() - start, 1), n, states.get("STARTING", 0), done)
        if not trace or row[1:3] != trace[-1][1:3]:
            trace.append(row)  # the changes only
        return n

    with Load(cluster, expected, clients=8) as load:  # 8 requests at once, 2 per replica batch: target 4 replicas
        up = wait_for(lambda: sample(load) == 2, "scale up to 2 replicas", timeout=60)
    down = wait_for(lambda: sample(None) == 1, "scale back down to 1 replica", timeout=60)
    print(f"\nautoscaling: up to 2 replicas {up:.1f}s into the burst; back to 1 {down:.1f}s after it; "
          f"burst {load.counts()}\ntrace (s since the burst, replicas running, starting, requests completed; "
          f"-1 = after it): {trace}")
    assert load.counts()["lost"] == 0, load.lost_reasons[:5]


def test_a_replica_with_another_artifact_never_takes_traffic(cluster, demo_onnx):
    """The deploying side read one config.json, the node has another: the replica refuses to start and Ray
    reports the deployment as failed (serve.run raises), so nothing answers on its route."""
    spec = dataclasses.replace(spec_for(demo_onnx, 2), artifact_sha256="0" * 64)
    options = {**rs.deployment_options(spec, replicas=1, num_cpus=0.1), "max_constructor_retry_count": 1}
    with pytest.raises(RuntimeError, match="failed"):
        serve.run(rs.build_app(spec, options), name="other-artifact", route_prefix="/other")
    status = serve.status().applications["other-artifact"].deployments[rs.DEPLOYMENT_NAME]
    assert status.status == "DEPLOY_FAILED" and "is not the one deployed" in status.message, status.message
    r = httpx.get(cluster + "/other/health", timeout=TIMEOUT_S)
    assert r.status_code != 200
    serve.delete("other-artifact")


def test_overflow_beyond_max_queue_is_a_json_503(cluster, demo_onnx):
    """--max-batch 1 --max-queue 1: with one request running, of two more one waits in Ray's router and the other
    gets 503 at once (JSON, Retry-After), not a place in an unbounded queue; the waiting one runs when the slot
    frees."""
    spec = dataclasses.replace(spec_for(demo_onnx, 1), max_queue=1)
    serve.run(rs.build_app(spec, rs.deployment_options(spec, replicas=1, num_cpus=0.1)), name="tiny",
              route_prefix="/tiny")
    url, auth = cluster + "/tiny/v1/completions", {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": "ROMEO:\n", "max_tokens": 20000, "temperature": 0, "stream": True, "sliding_window": True}
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(httpx.post(url, json={"prompt": "A", "max_tokens": 2}, headers=auth, timeout=TIMEOUT_S))

    try:
        with httpx.Client(headers=auth, timeout=TIMEOUT_S) as c, c.stream("POST", url, json=long) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # it holds the replica's only slot
            clients = [threading.Thread(target=post, daemon=True) for _ in range(2)]
            for t in clients:
                t.start()
            wait_for(lambda: len(answers) >= 1, "an answer while the slot is taken", timeout=30)
            time.sleep(1.0)
            assert len(answers) == 1  # the other one is still waiting
            r = answers[0]
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_busy_error", r.text
            assert r.headers["retry-after"] == "1"
        for t in clients:  # the stream closed: its row is cancelled and the waiting request runs
            t.join(TIMEOUT_S)
        assert len(answers) == 2 and answers[1].status_code == 200, answers[1:]
    finally:
        serve.delete("tiny")


def test_config_flags_and_artifact_check(tmp_path, demo_onnx):
    """Without Ray: the options derived from the flags, the serve config written, the replica's artifact check."""
    spec = spec_for(demo_onnx, 8)
    fixed = rs.deployment_options(spec, replicas=3)
    assert (fixed["num_replicas"], fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (3, 8, 256)
    auto = rs.deployment_options(spec, min_replicas=1, max_replicas=4)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 4, 8)
    out = tmp_path / "app.yaml"
    assert rs.main(["--model", str(demo_onnx), "--backend", "onnxruntime", "--max-batch", "8", "--min-replicas", "1",
                    "--max-replicas", "4", "--write-config", str(out)]) == 0
    import yaml

    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["import_path"] == "runtime.ray_serve:app_builder" and app["args"]["max_batch"] == 8
    assert app["args"]["artifact_sha256"] == rs.artifact_digest(str(demo_onnx))
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 4
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))  # what `serve deploy` checks first
    assert isinstance(rs.app_builder(app["args"]), serve.Application)  # what its import path builds
    rs.check_artifact(spec)  # the artifact as exported passes
    with pytest.raises(ModelError, match="not the one deployed"):
        rs.check_artifact(rs.ReplicaSpec(**{**spec.__dict__, "artifact_sha256": "0" * 64}))
    copy = tmp_path / "copy"
    shutil.copytree(demo_onnx, copy)
    with open(copy / "model.onnx", "r+b") as f:  # one byte changed on this node's copy
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ModelError, match="sha256 does not match"):
        rs.check_artifact(rs.ReplicaSpec(**{**spec.__dict__, "model": str(copy)}))
    with pytest.raises(ModelError, match="no such artifact folder"):
        rs.check_artifact(rs.ReplicaSpec(**{**spec.__dict__, "model": str(tmp_path / "missing")}))
    for flags, message in ((["--replicas", "2", "--max-replicas", "3"], "not both"),
                           (["--min-replicas", "3", "--max-replicas", "2"], "above --max-replicas"),
                           (["--replicas", "0"], "--replicas must be >= 1"), (["--access-log"], "Ray Serve logs"),
                           (["--num-cpus", "0"], "--num-cpus must be > 0")):
        with pytest.raises(ModelError, match=message):
            rs.main([*flags, "--write-config", str(out)])
    with pytest.raises(ModelError, match="parent folder does not exist"):
        rs.main(["--write-config", str(tmp_path / "no" / "app.yaml")])


@pytest.mark.slow
def test_cli_joins_the_cluster_serves_and_leaves_on_sigterm(cluster, demo_onnx, cli_backend):
    """`python -m runtime.ray_serve --address ...`: deploys onto the running cluster (its proxy), serves the
    CLI's tokens, and on SIGTERM deletes its application and exits 0."""
    serve.delete(rs.APP_NAME)
    env = {**os.environ, "PYTHONPATH": rs.local_ray_env()["PYTHONPATH"]}
    cmd = [sys.executable, "-m", "runtime.ray_serve", "--address", ray.get_runtime_context().gcs_address,
           "--model", str(demo_onnx), "--backend", "onnxruntime", "--threads", "1", "--num-cpus", "0.5",
           "--replicas", "1", "--api-key", KEY, "--served-model-name", "demo"]
    with subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
            reader.start()
            wait_for(lambda: any(x.startswith("serving 'demo' on Ray Serve") for x in lines) or proc.poll() is not None,
                     "the CLI's deployment")
            assert proc.poll() is None, "".join(lines[-20:])
            client = openai.OpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)
            r = client.completions.create(model="demo", prompt="JULIET:\n", max_tokens=50, temperature=0)
            assert r.choices[0].text == cli_text(cli_backend, "JULIET:\n", 50)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT_S) == 0, "".join(lines[-20:])
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rs.APP_NAME not in serve.status().applications


@pytest.mark.parametrize("case", ["ray_text_503", "no_response", "cut_stream", "json_passes"])
def test_proxy_errors_become_json(case):
    """JsonErrors (Ray's proxy middleware) on stand-ins for what the proxy sends, without Ray."""
    import asyncio

    async def app(scope, receive, send):
        if case == "ray_text_503":  # Ray's backpressure answer
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})
        elif case == "cut_stream":  # the replica died after two events
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        elif case == "json_passes":
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "ours"}}'})

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=rs.JsonErrors(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as c:
            return await c.post("/v1/completions", json={})

    r = asyncio.run(get())
    if case == "ray_text_503":
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "Request dropped due to backpressure", "type": "server_busy_error",
                                     "param": None, "code": None}
    elif case == "no_response":
        assert r.status_code == 500 and "replica serving this request failed" in r.json()["error"]["message"]
    elif case == "cut_stream":
        lines = [x for x in r.text.splitlines() if x]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error"
    else:
        assert r.status_code == 400 and r.json() == {"error": {"message": "ours"}}
