"""The HTTP API when a node dies: a stream in flight ends with the API's error event naming the
node, later requests get 503 with Retry-After in each API's error shape, and /health says why."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time

from cluster_helpers import running_cluster
from http_helpers import api_url, get, post_json, sse_events
from layouts import LAYOUTS
from tiny_models import make_tiny_checkpoint


def test_node_loss_over_http(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    directory = tmp_path / "cluster"
    with running_cluster(directory, path, 2, LAYOUTS["llama"][2], recovery=False) as cluster:
        url = api_url(directory)
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert b'"text"' in response.readline()  # the first token is out
        state = json.loads((directory / ".pomona" / "cluster.json").read_text())
        os.kill(state["local_workers"]["b"]["pid"], signal.SIGKILL)
        started = time.monotonic()
        rest = response.read().decode()  # ends: the server closes the stream
        connection.close()
        assert time.monotonic() - started < 10
        events = [data for _, data in sse_events(rest)]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "node 'b'" in error["message"] and error["type"] == "server_overloaded"

        deadline = time.monotonic() + 10
        while cluster.status().state != "degraded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status, headers, reply = post_json(
            f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 503 and int(headers["Retry-After"]) > 0
        assert "node 'b'" in reply["error"]["message"] and "unreachable" in reply["error"]["message"]
        status, headers, reply = post_json(
            f"{url}/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 503 and reply["error"]["type"] == "overloaded_error" and "Retry-After" in headers
        metrics = get(f"{url}/metrics")[2]
        assert 'pomona_requests_total{api="openai_completions",outcome="503 in stream"} 1.0' in metrics
        status, _, health = get(f"{url}/health")
        assert status == 503 and health["state"] == "degraded" and "node 'b'" in health["error"]
