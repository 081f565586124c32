"""The `api:` section of cluster.yaml: the coordinator's HTTP API (OpenAI and Anthropic formats).

```yaml
api:
  enabled: true                 # default; false: no HTTP server (the gRPC service stays)
  host: 127.0.0.1               # 0.0.0.0 to serve other machines
  port: 8000
  keys: [sk-local-1]            # default none: no key needed; else `Authorization: Bearer KEY`
                                #   or `x-api-key: KEY` must name one of these
  max_concurrent_requests: 16   # requests generating at once; more wait in the queue
  max_queue: 64                 # requests waiting for a slot; beyond: 429 with Retry-After
  max_tokens: 4096              # the most new tokens one request may ask for
```

Parsed by `pomona.config.load_cluster_config`, which calls `parse_api`; errors name the file, line
and field like the rest of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from pomona.yaml_reader import LineList, LineMap, Reader, kind

API_KEYS = ("enabled", "host", "port", "keys", "max_concurrent_requests", "max_queue", "max_tokens")


@dataclass(frozen=True)
class ApiSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    keys: tuple[str, ...] = ()  # empty: no key is needed
    max_concurrent_requests: int = 16
    max_queue: int = 64
    max_tokens: int = 4096

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


def parse_api(reader: Reader, root: LineMap) -> ApiSettings:
    """The `api:` block of the yaml's top level (defaults when it is absent)."""
    defaults = ApiSettings()
    if root.get("api") is None:
        return defaults
    block = reader.block(root, "api", "")
    reader.keys(block, "api", API_KEYS)
    enabled = block.get("enabled", True)
    if not isinstance(enabled, bool):
        reader.bad(block, "enabled", "api", f"must be true or false, not {kind(enabled)}")
    keys: tuple[str, ...] = ()
    if block.get("keys") is not None:
        value = block["keys"]
        if not isinstance(value, LineList) or not all(isinstance(k, str) and k.strip() for k in value):
            problem = f"must be a list of non-empty strings (the accepted API keys), not {kind(value)}"
            reader.bad(block, "keys", "api", problem + "; omit it to accept requests without a key")
        keys = tuple(value)
    return ApiSettings(
        enabled=enabled,
        host=reader.string(block, "host", "api", defaults.host),
        port=reader.port(block, "port", "api", defaults.port),
        keys=keys,
        max_concurrent_requests=reader.integer(
            block, "max_concurrent_requests", "api", defaults.max_concurrent_requests, 1
        ),
        max_queue=reader.integer(block, "max_queue", "api", defaults.max_queue, 0),
        max_tokens=reader.integer(block, "max_tokens", "api", defaults.max_tokens, 1),
    )


def check_api_port(
    reader: Reader, root: LineMap, api: ApiSettings, taken: dict[tuple[str, int], str]
) -> None:
    """Fail when the API's host:port is the coordinator's or a node's (`taken`: address -> owner)."""
    if not api.enabled:
        return
    host = api.host.lower()
    owner = taken.get(("127.0.0.1" if host == "localhost" else host, api.port))
    if owner is None and host in ("0.0.0.0", "::"):  # every interface: any use of the port clashes
        owner = next((who for (_, port), who in taken.items() if port == api.port), None)
    if owner is None:
        return
    problem = f"{api.address} is already used by {owner}; pick another port for the HTTP API"
    if root.get("api") is not None and "port" in root["api"]:
        reader.bad(root["api"], "port", "api", problem)
    reader.fail("api.port", None, problem + " (set api.port)")
