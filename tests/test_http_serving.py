"""Serving over HTTP on a real 2-stage expert-parallel cluster (tiny random Mixtral; node b also
holds half of stage a's experts): API keys, 16 concurrent streams equal to each alone, the queue
limit (429 with Retry-After), a disconnecting client freeing every stage's caches within 1 s,
Prometheus metrics, and the web page in headless Chromium."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import time
from pathlib import Path

import openai
import pytest
from cluster_helpers import free_ports, running_cluster
from http_helpers import get, post_json
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import make_tiny_checkpoint

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import worker_pb2, worker_pb2_grpc

KEYS = ["key-one", "key-two"]
CONCURRENCY = 16
PROMPTS = [
    f"Request {i}: the quick brown fox number {i * 7} jumps" + " over" * (i % 4) for i in range(CONCURRENCY)
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("http_serving")
    path = make_tiny_checkpoint("mixtral", root / "mixtral")
    port = free_ports(1)[0]
    api = {
        "host": "127.0.0.1",
        "port": port,
        "keys": KEYS,
        "max_concurrent_requests": CONCURRENCY,
        "max_queue": 0,
    }
    experts = [{"node": "b", "layers": [0, 2], "experts": [0, 4]}]
    generation = {"micro_batches": 2}  # two in flight around the ring (auto: one on loopback)
    with running_cluster(
        root / "cluster", path, 2, [(0, 2), (2, 4)], experts, api=api, generation=generation
    ) as cluster:
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0, timeout=300)
        yield cluster, url, client


def _stream_text(client, prompt: str, max_tokens: int) -> str:
    stream = client.completions.create(
        model="mixtral", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join(chunk.choices[0].text for chunk in stream)


def test_api_keys(served):
    cluster, url, client = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, _, reply = post_json(f"{url}/v1/chat/completions", body)
    assert status == 401 and reply["error"]["type"] == "authentication_error"
    assert "no API key" in reply["error"]["message"]
    status, _, reply = post_json(f"{url}/v1/chat/completions", body, {"Authorization": "Bearer nope"})
    assert status == 401 and "wrong API key" in reply["error"]["message"]
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, _, reply = post_json(f"{url}/v1/chat/completions", body, {"Authorization": f"Bearer {KEYS[1]}"})
    assert status == 200, reply
    anthropic = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    status, _, reply = post_json(f"{url}/v1/messages", anthropic, {"x-api-key": "nope"})
    assert status == 401 and reply == {"type": "error", "error": reply["error"]}
    assert reply["error"]["type"] == "authentication_error"
    status, _, reply = post_json(f"{url}/v1/messages", anthropic, {"x-api-key": KEYS[0]})
    assert status == 200, reply
    assert get(f"{url}/health")[0] == 200  # health and the page need no key


def test_sixteen_concurrent_streams_equal_each_alone_and_the_queue_limit(served):
    cluster, url, client = served
    max_tokens = 20
    alone = [_stream_text(client, p, max_tokens) for p in PROMPTS]
    before = {s.node: (s.batch_steps, s.batch_rows) for s in cluster.status().stages}
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(_stream_text, client, p, max_tokens) for p in PROMPTS]
        # With every slot taken and max_queue 0, one more request is refused at once.
        deadline = time.monotonic() + 60
        while get(f"{url}/health")[2]["active_requests"] < CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, reply = post_json(
            f"{url}/v1/completions",
            {"prompt": "one too many", "max_tokens": 2},
            {"Authorization": f"Bearer {KEYS[0]}"},
        )
        together = [f.result(timeout=300) for f in futures]
    assert status == 429, reply
    assert int(headers["Retry-After"]) >= 1 and reply["error"]["type"] == "rate_limit_error"
    assert together == alone
    assert all(text for text in together)
    # Continuous batching: on each stage, the streams shared decode steps (the experts node b
    # holds for stage a's layers get a step's tokens in one dispatch per MoE layer).
    for stage in cluster.status().stages:
        if not stage.experts_only:
            steps = stage.batch_steps - before[stage.node][0]
            rows = stage.batch_rows - before[stage.node][1]
            assert rows >= CONCURRENCY and steps < rows / 2, (stage.node, steps, rows)


def _cache_state(cluster) -> list[tuple[int, int]]:
    return [(stage.active_requests, stage.cache_bytes) for stage in cluster.status().stages]


class _WorkerCaches:
    """Each node's (active requests, cache bytes), asked of the workers directly and at once: a
    tighter bound on when caches were freed than a poll through the coordinator."""

    def __init__(self, cluster):
        addresses = [stage.address for stage in cluster.status().stages]
        secrets = cluster.node_secrets()
        self._channels = [auth.channel(a, CHANNEL_OPTIONS, secrets) for a in addresses]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self._stubs))

    def __call__(self) -> list[tuple[int, int]]:
        calls = [self._pool.submit(s.Status, worker_pb2.StatusRequest(), timeout=10) for s in self._stubs]
        return [(r.active_requests, r.cache_bytes) for r in (c.result(timeout=15) for c in calls)]

    def close(self) -> None:
        self._pool.shutdown()
        for channel in self._channels:
            channel.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_disconnect_cancels_and_every_stage_frees_its_caches(served, stream):
    cluster, url, client = served
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    # Greedy on this checkpoint: no end-of-sequence token in its first 400 tokens ("A long story"
    # ended after 8, so the request was sometimes over before the test saw it run).
    body = {"prompt": "Once upon a time " * 4, "max_tokens": 1500, "temperature": 0, "stream": stream}
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"},
    )
    deadline = time.monotonic() + 60
    if stream:
        response = connection.getresponse()
        assert response.status == 200
        while b'"text"' not in response.readline():  # the first token arrived
            assert time.monotonic() < deadline
    while not all(active == 1 and cache > 0 for active, cache in _cache_state(cluster)):
        if time.monotonic() > deadline:
            answer = "" if stream else connection.getresponse().read()[:300]
            raise AssertionError(f"the request never ran: {_cache_state(cluster)} {answer!r}")
        time.sleep(0.05)
    caches = _WorkerCaches(cluster)
    try:
        connection.sock.close()  # the client goes away mid-generation
        connection.close()
        closed = time.monotonic()
        while (state := caches()) != [(0, 0), (0, 0)]:
            assert time.monotonic() - closed < 5, state
        freed_s = time.monotonic() - closed
    finally:
        caches.close()
    assert freed_s < 1.0, f"caches freed {freed_s:.2f} s after the disconnect"
    metrics = get(f"{url}/metrics")[2]
    assert 'outcome="cancelled"' in metrics


def _samples(text: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_metrics(served):
    cluster, url, client = served
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="mixtral", messages=messages, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mixtral", messages=messages, n=3)
    status, headers, text = get(f"{url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = _samples(text)
    ok = [s for s in samples["pomona_requests_total"] if s.labels == {"api": "openai_chat", "outcome": "ok"}]
    assert ok and ok[0].value >= 1
    refused = [
        s for s in samples["pomona_requests_total"] if s.labels == {"api": "openai_chat", "outcome": "400"}
    ]
    assert refused and refused[0].value >= 1
    assert samples["pomona_generated_tokens_total"][0].value >= 4
    assert [s for s in samples["pomona_time_to_first_token_seconds_count"]][0].value >= 1
    assert samples["pomona_inter_token_seconds_count"][0].value >= 1
    assert "pomona_queue_depth" in samples and "pomona_active_requests" in samples
    measured = {
        s.labels["node"] for s in samples["pomona_stage_compute_seconds"] if s.labels["kind"] == "measured"
    }
    assert measured == {"a", "b"}
    links = {(s.labels["source"], s.labels["target"]) for s in samples["pomona_link_latency_seconds"]}
    assert ("a", "b") in links and ("b", "a") in links
    power = samples["pomona_node_power_watts"]
    assert {s.labels["source"] for s in power} == {"estimated"} and all(s.value > 0 for s in power)
    assert all(s.value > 0 for s in samples["pomona_node_energy_joules_total"])
    experts = samples["pomona_expert_tokens_total"]
    on_b = [s for s in experts if s.labels["node"] == "b" and s.labels["layer"] in ("0", "1")]
    assert on_b and sum(s.value for s in on_b) > 0
    assert samples["pomona_cluster_ready"][0].value == 1
    batch = {s.labels["node"]: s.value for s in samples["pomona_stage_batch_size"]}
    assert set(batch) == {"a", "b"} and all(size >= 1 for size in batch.values())


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium here: run deploy/install_test_deps.sh (apt chromium)"
)
def test_web_page_in_headless_chromium(served, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    cluster, url, client = served
    _stream_text(client, PROMPTS[0], 4)  # some expert load for the heat map
    shots = Path(os.environ.get("POMONA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/", timeout=30_000)
            try:
                page.wait_for_function("Number(document.body.dataset.polled || 0) >= 1", timeout=30_000)
            except Exception:
                state = page.text_content("#state")
                pytest.fail(f"the page never drew the cluster: state {state!r}, {errors}")
            assert page.text_content("#state").startswith("ready")
            nodes = page.locator("#nodes .node")
            assert nodes.count() == 2
            assert "layers [0, 2)" in nodes.nth(0).text_content()
            assert "estimated" in nodes.nth(0).locator(".power").text_content()
            assert page.locator("#nodes .arrow").first.text_content().endswith("ms")
            assert page.locator("#links tbody tr").count() >= 2
            assert page.locator("#heatmap .cell").count() > 0
            assert "routed experts: layer 0 [0-3], layer 1 [0-3]" in nodes.nth(1).text_content()
            assert "on b" in page.locator("#heatmap .cell").first.get_attribute("title")
            # The chat box streams a reply (the key goes in its field).
            page.fill("#api-key", KEYS[0])
            page.fill("#chat-input", "Hello there")
            page.click("#chat-send")
            page.wait_for_selector("#chat-log .message.assistant[data-done=true]", timeout=120_000)
            reply = page.text_content("#chat-log .message.assistant")
            expected = (
                client.chat.completions.create(
                    model="mixtral",
                    messages=[{"role": "user", "content": "Hello there"}],
                    max_tokens=64,
                    temperature=0,
                )
                .choices[0]
                .message.content
            )
            assert reply == expected
            assert "J/token" in page.text_content("#chat-usage")
            screenshot = shots / "pomona-web-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"web page screenshot: {screenshot}")
            assert screenshot.stat().st_size > 10_000
            assert not errors, errors
        finally:
            browser.close()
