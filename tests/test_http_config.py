"""The `api:` section of cluster.yaml: defaults, every setting read, and one clear message for each
broken form (naming the line and the field)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pomona.api_config import ApiSettings
from pomona.config import load_cluster_config
from pomona.errors import ConfigError

NODES = """\
coordinator: {host: 127.0.0.1, port: 50050}
nodes:
  - {name: a, host: 127.0.0.1, port: 50051}
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "cluster.yaml"
    path.write_text(NODES + textwrap.dedent(text))
    return load_cluster_config(path)


def test_on_by_default(tmp_path):
    api = load(tmp_path, "").api
    assert api == ApiSettings()
    assert api.enabled and api.url == "http://127.0.0.1:8000" and api.keys == ()


def test_every_setting(tmp_path):
    api = load(
        tmp_path,
        """\
        api:
          host: 0.0.0.0
          port: 9001
          keys: [one, two]
          max_concurrent_requests: 4
          max_queue: 0
          max_tokens: 128
        """,
    ).api
    assert api == ApiSettings(True, "0.0.0.0", 9001, ("one", "two"), 4, 0, 128)
    assert api.url == "http://127.0.0.1:9001"  # what to print for a wildcard address
    assert not load(tmp_path, "api: {enabled: false, port: 50051}\n").api.enabled  # off: no clash


BROKEN = [
    ("not-a-mapping", "api: 8000\n", "line 4: api: must be a mapping"),
    ("unknown-key", "api: {prot: 1}\n", "api.prot: unknown key; did you mean 'port'?"),
    ("port-range", "api: {port: 0}\n", "api.port: must be a whole number from 1 to 65535"),
    ("enabled-string", "api: {enabled: 'yes'}\n", "api.enabled: must be true or false"),
    ("keys-string", "api: {keys: secret}\n", "api.keys: must be a list of non-empty strings"),
    ("keys-empty-string", "api: {keys: ['']}\n", "api.keys: must be a list of non-empty strings"),
    ("concurrency-zero", "api: {max_concurrent_requests: 0}\n", "api.max_concurrent_requests: must be"),
    ("queue-negative", "api: {max_queue: -1}\n", "api.max_queue: must be a whole number of at least 0"),
    ("max-tokens-zero", "api: {max_tokens: 0}\n", "api.max_tokens: must be a whole number of at least 1"),
    ("clash-with-node", "api: {port: 50051}\n", "127.0.0.1:50051 is already used by node 'a'"),
    ("clash-with-coordinator", "api: {port: 50050}\n", "already used by the coordinator"),
    ("wildcard-clash", "api: {host: 0.0.0.0, port: 50051}\n", "0.0.0.0:50051 is already used by node 'a'"),
]


@pytest.mark.parametrize("text,message", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_api_section(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)
    assert str(tmp_path / "cluster.yaml") in str(info.value)
