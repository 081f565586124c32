"""Helpers for the HTTP API tests: the API's URL of a running test cluster, plain JSON requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import yaml


def api_url(directory: Path) -> str:
    api = yaml.safe_load((directory / "cluster.yaml").read_text())["api"]
    return f"http://{api['host']}:{api['port']}"


def post_json(url: str, body: dict | bytes, headers: dict | None = None, timeout_s: float = 120):
    """(status, headers, parsed JSON or text) of a POST; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    return _send(request, timeout_s)


def get(url: str, headers: dict | None = None, timeout_s: float = 30):
    return _send(urllib.request.Request(url, headers=headers or {}), timeout_s)


def _send(request: urllib.request.Request, timeout_s: float):
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, dict(error.headers), error.read()
    text = raw.decode()
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) of each server-sent event in `text`."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, "\n".join(data)))
    return events
