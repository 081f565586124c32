"""The coordinator's HTTP API (aiohttp, on the coordinator's own event loop): routing, API keys,
admission (concurrency and queue limits), and the request shell around the `RequestRouter`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI), `POST /v1/messages`
(Anthropic), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), `GET /api/cluster`
(the web page's JSON) and the web page itself at `/` (`coordinator/static/`).

Every generation goes through the cluster's one `RequestRouter`, as gRPC requests do. A client that
disconnects cancels its handler (aiohttp's handler cancellation), which closes the router's
generator, which sends the pipeline a cancel: every stage frees the request's caches. Errors
before the first token are HTTP errors in the API's own JSON shape; errors after it are the API's
stream error event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from pomona.api_config import ApiSettings
from pomona.errors import PomonaError

from . import anthropic_format, openai_format
from .http_metrics import RequestTimer, ServingMetrics
from .http_params import ApiError, ParsedRequest, bad_request
from .requests import RequestError

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
NOT_READY_RETRY_S = 5
QUEUE_FULL_RETRY_S = 1


class Admission:
    """At most `max_active` requests generate at once; up to `max_queue` more wait, in order."""

    def __init__(self, max_active: int, max_queue: int, metrics: ServingMetrics):
        self.max_active, self.max_queue, self.metrics = max_active, max_queue, metrics
        self.active = self.waiting = 0
        self._turn = asyncio.Condition()

    def _publish(self) -> None:
        self.metrics.active.set(self.active)
        self.metrics.queue_depth.set(self.waiting)

    @asynccontextmanager
    async def slot(self):
        if self.active >= self.max_active and self.waiting >= self.max_queue:
            raise ApiError(
                429,
                "rate_limit",
                f"the server is at capacity ({self.active} requests running, "
                f"{self.waiting} queued); retry later",
                retry_after_s=QUEUE_FULL_RETRY_S,
            )
        self.waiting += 1
        self._publish()
        try:
            async with self._turn:
                await self._turn.wait_for(lambda: self.active < self.max_active)
                self.active += 1
        finally:
            self.waiting -= 1
            self._publish()
        try:
            yield
        finally:
            self.active -= 1
            self._publish()
            async with self._turn:
                self._turn.notify()


def model_ids(cluster) -> list[str]:
    """The served model's id (the checkpoint's name) first, then other names that reach it."""
    path = cluster.model.path if cluster.model is not None else Path(cluster.config.model)
    name = path.stem if path.suffix == ".gguf" else path.name
    return [name, str(path), cluster.config.model]


class HttpApi:
    def __init__(self, cluster, service, settings: ApiSettings):
        self.cluster, self.settings = cluster, settings
        self.metrics = ServingMetrics(cluster, service)
        self.admission = Admission(settings.max_concurrent_requests, settings.max_queue, self.metrics)
        self._runner: web.AppRunner | None = None
        app = web.Application(middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/cluster", self._cluster)
        app.router.add_get("/", self._page)
        app.router.add_static("/static/", STATIC_DIR)
        self.app = app

    async def start(self) -> None:
        """Listen on api.host:api.port; raises PomonaError naming the address when it cannot."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            self._runner = None
            raise PomonaError(
                f"the HTTP API cannot listen on {self.settings.address} ({error.strerror or error}); "
                "pick another api.port in cluster.yaml"
            ) from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- shell ----------------------------------------------------------------------------------

    @staticmethod
    def _error_response(request: web.Request, error: ApiError) -> web.Response:
        anthropic = request.path.startswith("/v1/messages")
        body = (anthropic_format if anthropic else openai_format).error_body(error)
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
        return web.json_response(body, status=error.status, headers=headers)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            if request.path.startswith("/v1/"):
                self._authorize(request)
            return await handler(request)
        except ApiError as error:
            return self._error_response(request, error)
        except web.HTTPException as error:
            if not request.path.startswith("/v1/"):
                raise
            kind = "not_found" if error.status == 404 else "invalid_request"
            return self._error_response(
                request, ApiError(error.status, kind, f"{error.reason}: {request.path}")
            )

    def _authorize(self, request: web.Request) -> None:
        if not self.settings.keys:
            return
        header = request.headers.get("Authorization", "")
        key = (
            header[7:].strip()
            if header.lower().startswith("bearer ")
            else request.headers.get("x-api-key", "")
        )
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.settings.keys):
            what = "a wrong API key" if key else "no API key"
            raise ApiError(
                401,
                "authentication",
                f"{what} was given; send one of api.keys as `Authorization: Bearer KEY` or `x-api-key: KEY`",
            )

    def _check_ready(self) -> None:
        cluster = self.cluster
        if cluster.state == "ready" and cluster.router is not None:
            return
        why = cluster.error if cluster.state == "degraded" else f"the cluster is {cluster.state}"
        raise ApiError(
            503,
            "overloaded",
            f"{why}; retry later (`pomona status` says more)",
            retry_after_s=NOT_READY_RETRY_S,
        )

    @staticmethod
    async def _body(request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body must be JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    # -- generation -----------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(
            request,
            "openai_chat",
            openai_format.parse_chat,
            lambda p, d: openai_format.OpenAiAnswer(p, d, chat=True),
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(
            request,
            "openai_completions",
            openai_format.parse_completion,
            lambda p, d: openai_format.OpenAiAnswer(p, d, chat=False),
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(
            request, "anthropic_messages", anthropic_format.parse_messages, anthropic_format.AnthropicAnswer
        )

    async def _generate(self, request: web.Request, api: str, parse: Callable, answer_for: Callable):
        timer = RequestTimer(self.metrics)
        outcome = "cancelled"  # unless it ends otherwise: the client went away
        try:
            body = await self._body(request)
            parsed: ParsedRequest = parse(body, model_ids(self.cluster), self.settings.max_tokens)
            self._check_ready()
            router = self.cluster.router
            try:
                prompt_tokens = len(router.prompt_token_ids(parsed.request))
            except RequestError as error:
                raise bad_request(str(error), "messages") from None
            answer = answer_for(parsed, router.tokenizer.decode)
            async with self.admission.slot():
                run = self._stream if parsed.stream else self._respond
                response, outcome = await run(
                    request, router.generate(parsed.request), answer, prompt_tokens, timer
                )
                return response
        except ApiError as error:
            outcome = str(error.status)
            raise
        finally:
            self.metrics.requests.labels(api, outcome).inc()

    @staticmethod
    def _failure(error: Exception) -> ApiError:
        if isinstance(error, RequestError):
            return bad_request(str(error))
        return ApiError(503, "overloaded", str(error), retry_after_s=NOT_READY_RETRY_S)

    # _respond and _stream return (the response, the outcome for pomona_requests_total).

    async def _respond(self, request, chunks, answer, prompt_tokens: int, timer: RequestTimer):
        try:
            async for chunk in chunks:
                if chunk.HasField("summary"):
                    self.metrics.prompt_tokens.inc(chunk.summary.prompt_tokens)
                    return web.json_response(answer.response(chunk.summary)), "ok"
                timer.on_tokens(len(chunk.token_ids))
                answer.add(chunk)
        except PomonaError as error:
            raise self._failure(error) from None
        finally:
            await chunks.aclose()
        raise ApiError(500, "server", "the generation ended without a summary")

    async def _stream(self, request, chunks, answer, prompt_tokens: int, timer: RequestTimer):
        try:
            # The first token (or an error) before the headers: errors before any output are
            # plain HTTP errors.
            first = await chunks.__anext__()
        except PomonaError as error:
            await chunks.aclose()
            raise self._failure(error) from None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        outcome = "ok"
        try:
            for event in answer.stream_head(prompt_tokens):
                await response.write(event)
            chunk = first
            while True:
                if chunk.HasField("summary"):
                    self.metrics.prompt_tokens.inc(chunk.summary.prompt_tokens)
                    for event in answer.stream_tail(chunk.summary):
                        await response.write(event)
                    break
                timer.on_tokens(len(chunk.token_ids))
                for event in answer.stream_delta(chunk):
                    await response.write(event)
                chunk = await chunks.__anext__()
        except PomonaError as error:
            failure = self._failure(error)
            outcome = f"{failure.status} in stream"
            for event in answer.stream_error(failure):
                await response.write(event)
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response, outcome

    # -- the rest -------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        created = int(self.cluster.config.path.stat().st_mtime)
        model = {
            "id": model_ids(self.cluster)[0],
            "object": "model",
            "created": created,
            "owned_by": "pomona",
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        cluster = self.cluster
        body = {
            "status": "ok" if cluster.state == "ready" else cluster.state,
            "state": cluster.state,
            "error": cluster.error,
            "active_requests": self.admission.active,
            "queued_requests": self.admission.waiting,
        }
        return web.json_response(body, status=200 if cluster.state == "ready" else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _cluster(self, request: web.Request) -> web.Response:
        counts = {"active": self.admission.active, "queued": self.admission.waiting}
        return web.json_response(await self.metrics.cluster_json(counts))

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")
