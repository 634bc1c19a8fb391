"""The HTTP API (FastAPI): OpenAI's ``/v1/files``, ``/v1/batches`` and ``/v1/models``, the
synchronous ``/v1/chat/completions`` and ``/v1/responses`` (the flex tier, ``gateway.flex``), and
an async chat-completions endpoint for services that do not speak Kafka.

Every call carries an API key (``Authorization: Bearer …``); the key names the tenant. A tenant
never sees another tenant's files, batches or requests: they answer 404, like ids that do not exist.
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations (the
# Tenant dependency is local to create_api) at runtime.
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO, Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from analytics.lookups import Lookups
from analytics.results import chat_completion, error_code, response_object
from core.errors import SluiceError
from core.headers import valid_traceparent
from core.metrics import HTTP_REQUESTS, HTTP_SECONDS
from core.quota import QuotaLedger
from core.settings import Settings
from gateway.batches import BatchError, BatchNotFound, BatchService, QuotaExceeded, Submitter
from gateway.capacity import Capacity
from gateway.files import FileMeta, FileStore
from gateway.flex import Refused, SyncCall, Tier, http_status, sse_chat_chunks, stream_result, streaming, tier_of
from gateway.keys import KeyInfo, KeyStore
from gateway.limits import BodyRefused, check_metadata, parse_json_body
from gateway.openai_format import (
    LineError,
    batch_object,
    request_from_body,
    request_from_responses_body,
    unix,
)
from gateway.waiting import ResultWaiter
from gateway.webhooks import TargetRefused, check_target
from schemas import (
    QUOTA_KEY,
    QUOTA_KEY_TOKENS,
    Endpoint,
    InferenceRequest,
    InferenceResult,
    PipelineRejection,
    Priority,
    ResultStatus,
)

__all__ = ["ApiError", "Services", "create_api"]

logger = logging.getLogger(__name__)


class ApiError(SluiceError):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.kind, self.headers = status, code, kind, headers


@dataclass
class Services:
    settings: Settings
    keys: KeyStore
    files: FileStore
    batches: BatchService
    publisher: Submitter
    lookups: Lookups | None
    # Async requests this gateway accepted, until their status reaches ClickHouse (read-your-writes).
    recent: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # The synchronous tier: the results reader and the wait estimate (None: those endpoints answer 503).
    waiter: ResultWaiter | None = None
    capacity: Capacity | None = None
    # The catalog's model names, for /v1/models.
    models: list[str] = field(default_factory=list)
    # Enqueued-token quotas, as the ledger topic says (None: no tenant has one).
    quota: QuotaLedger | None = None


class _Counting:
    """Reads an upload through, counting bytes and non-empty lines, refusing past the limits."""

    def __init__(self, src: IO[bytes], meta: FileMeta, max_bytes: int, max_lines: int | None) -> None:
        self.src, self.meta, self.max_bytes, self.max_lines = src, meta, max_bytes, max_lines
        self._open_line = False

    def read(self, n: int = -1) -> bytes:
        chunk = self.src.read(n)
        if not chunk:
            if self._open_line:
                self._line()
                self._open_line = False
            return chunk
        self.meta.bytes += len(chunk)
        if self.meta.bytes > self.max_bytes:
            raise ApiError(413, f"file is larger than {self.max_bytes} bytes", "file_too_large")
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            if part.strip():
                self._open_line = True
            if i < len(parts) - 1:
                if self._open_line:
                    self._line()
                self._open_line = False
        return chunk

    def _line(self) -> None:
        self.meta.lines += 1
        if self.max_lines is not None and self.meta.lines > self.max_lines:
            raise ApiError(400, f"a batch input file has at most {self.max_lines} lines", "too_many_lines")


class _CountingMiddleware:
    """Counts calls per route template and status. Plain ASGI, not ``@app.middleware``: Starlette's
    BaseHTTPMiddleware hides the client's disconnect from the endpoint, and a synchronous call
    must see its caller hang up to cancel its request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The route template, not the path: ids must not become label values.
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], route, str(status[0])).inc()
            HTTP_SECONDS.labels(scope["method"], route).observe(time.perf_counter() - t0)


def create_api(services: Services) -> FastAPI:
    s = services
    app = FastAPI(title="Sluice gateway", version="1", docs_url="/docs", redoc_url=None)

    app.add_middleware(_CountingMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": str(exc), "type": exc.kind, "param": None, "code": exc.code}},
            exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse(
            {"error": {"message": "; ".join(parts), "type": "invalid_request_error", "param": None, "code": None}},
            400,
        )

    @app.exception_handler(BodyRefused)
    async def _refused(request: Request, exc: BodyRefused) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": exc.code}},
            exc.status,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a malformed multipart body, an unknown route) in OpenAI's shape.
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}, 500
        )

    @app.exception_handler(Refused)
    async def _sync_refused(request: Request, exc: Refused) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SluiceError)
    async def _sluice_error(request: Request, exc: SluiceError) -> JSONResponse:
        status = 404 if isinstance(exc, BatchNotFound) else 429 if isinstance(exc, QuotaExceeded) else 400
        if not isinstance(exc, BatchError | LineError | TargetRefused):
            status = 503
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}}, status
        )

    def key_of(authorization: Annotated[str | None, Header()] = None) -> KeyInfo:
        scheme, _, key = (authorization or "").partition(" ")
        info = s.keys.info(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if info is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        return info

    def tenant_of(key: Annotated[KeyInfo, Depends(key_of)]) -> str:
        return key.tenant

    Key = Annotated[KeyInfo, Depends(key_of)]
    Tenant = Annotated[str, Depends(tenant_of)]

    def key_metadata(key: KeyInfo) -> dict[str, str]:
        """What a request carries of its key's quota (the router counts it)."""
        if key.token_quota is None:
            return {}
        if s.quota is None:
            raise ApiError(
                503,
                "this API key has a token quota, and key quotas are not enabled on this gateway "
                "(SLUICE_TENANTS__KEY_QUOTAS=true on the gateway and the routers)",
                "unavailable",
            )
        return {QUOTA_KEY: key.key_id, QUOTA_KEY_TOKENS: str(key.token_quota)}

    def stamp_key(key: KeyInfo, req: InferenceRequest) -> None:
        """A caller's own values of the quota fields are dropped; the key's are set."""
        req.metadata.pop(QUOTA_KEY, None)
        req.metadata.pop(QUOTA_KEY_TOKENS, None)
        req.metadata.update(key_metadata(key))

    def admit(tenant: str, req: InferenceRequest) -> None:
        """The checks every single request meets before it is queued, whichever endpoint took it."""
        limit = s.settings.processor.max_prompt_chars
        if req.prompt_chars() > limit:
            # Refused now, as OpenAI does, not after a trip through the pipeline.
            message = f"the messages have {req.prompt_chars()} characters; the limit is {limit}"
            raise ApiError(400, message, "context_length_exceeded")
        if req.webhook_url:
            check_target(req.webhook_url, s.settings.webhooks.allow_private)
        queued = s.batches.outstanding(tenant)
        if queued + 1 > s.settings.gateway.max_queued_per_tenant:
            raise ApiError(429, f"tenant {tenant!r} has {queued} requests queued (the limit)", "rate_limit_exceeded")
        if s.quota is not None:
            try:
                s.quota.check(req)
            except PipelineRejection as exc:
                # Tokens come back as the tenant's requests finish; a minute is a fair first wait.
                raise ApiError(429, exc.detail, "quota_exceeded", "rate_limit_error", {"Retry-After": "60"}) from exc

    def own_file(tenant: str, file_id: str) -> FileMeta:
        meta = s.files.meta(file_id)
        if meta is None or meta.tenant != tenant or meta.expired():
            # An expired file is gone, whether or not the sweep has deleted it yet.
            raise ApiError(404, f"no file {file_id}", "not_found")
        return meta

    def expires_after(anchor: Any, seconds: Any, field_name: str) -> int | None:
        """OpenAI's ``expires_after`` ({anchor: created_at, seconds}); None when not given."""
        if anchor is None and seconds is None:
            return None
        f = s.settings.files
        if anchor != "created_at":
            raise ApiError(400, f"{field_name}.anchor must be 'created_at'", "invalid_request")
        try:
            value = int(seconds)
        except (TypeError, ValueError):
            raise ApiError(400, f"{field_name}.seconds must be an integer", "invalid_request") from None
        if not f.min_expires_after_s <= value <= f.max_expires_after_s:
            raise ApiError(
                400,
                f"{field_name}.seconds must be between {f.min_expires_after_s} and {f.max_expires_after_s}",
                "invalid_request",
            )
        return value

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    # -- files ------------------------------------------------------------------------------
    @app.post("/v1/files")
    def create_file(
        tenant: Tenant,
        file: Annotated[UploadFile, File()],
        purpose: Annotated[str, Form()],
        anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
        seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
    ) -> Any:
        if purpose not in ("batch", "batch_output", "user_data"):
            raise ApiError(400, f"purpose {purpose!r} is not supported; use 'batch'")
        ttl = expires_after(anchor, seconds, "expires_after")
        meta = FileMeta(tenant=tenant, filename=file.filename or "upload.jsonl", purpose=purpose)
        meta.expire_after(ttl if ttl is not None else s.settings.files.retention_s)
        limits = s.settings.files
        reader = _Counting(file.file, meta, limits.max_bytes, limits.max_lines if purpose == "batch" else None)
        s.files.put(meta, reader)  # type: ignore[arg-type]
        return meta.openai()

    @app.get("/v1/files")
    def list_files(tenant: Tenant, purpose: str | None = None) -> Any:
        data = [
            m.openai() for m in s.files.list(tenant) if (purpose is None or m.purpose == purpose) and not m.expired()
        ]
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/files/{file_id}")
    def retrieve_file(tenant: Tenant, file_id: str) -> Any:
        return own_file(tenant, file_id).openai()

    @app.get("/v1/files/{file_id}/content")
    def file_content(tenant: Tenant, file_id: str) -> StreamingResponse:
        own_file(tenant, file_id)
        return StreamingResponse(s.files.chunks(file_id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(tenant: Tenant, file_id: str) -> Any:
        own_file(tenant, file_id)
        return {"id": file_id, "object": "file", "deleted": s.files.delete(file_id)}

    # -- batches ----------------------------------------------------------------------------
    @app.post("/v1/batches", openapi_extra={"requestBody": _body_schema(BATCH_BODY)})
    async def create_batch(key: Key, request: Request) -> Any:
        tenant = key.tenant
        body = await _json(request, s.settings.gateway.max_body_bytes)
        known = {
            "input_file_id",
            "endpoint",
            "completion_window",
            "metadata",
            "priority",
            "webhook_url",
            "output_expires_after",
        }
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(400, f"unsupported field(s) {', '.join(unknown)}")
        if not isinstance(body.get("input_file_id"), str):
            raise ApiError(400, "input_file_id is required")
        webhook = body.get("webhook_url")
        if webhook is not None:
            check_target(str(webhook), s.settings.webhooks.allow_private)
        if body.get("metadata") is not None:
            check_metadata(body["metadata"])
        retention = body.get("output_expires_after")
        if retention is not None and not isinstance(retention, dict):
            raise ApiError(400, "output_expires_after must be an object {anchor, seconds}", "invalid_request")
        output_ttl = (
            expires_after(retention.get("anchor"), retention.get("seconds"), "output_expires_after")
            if retention
            else None
        )
        batch = s.batches.create(
            tenant,
            body["input_file_id"],
            endpoint=str(body.get("endpoint", Endpoint.CHAT_COMPLETIONS)),
            completion_window=str(body.get("completion_window", "24h")),
            metadata=body.get("metadata"),
            priority=body.get("priority", Priority.LOW),
            webhook_url=webhook,
            output_expires_after_s=output_ttl,
            request_metadata=key_metadata(key),
        )
        return batch_object(batch)

    @app.get("/v1/batches/{batch_id}")
    def retrieve_batch(tenant: Tenant, batch_id: str) -> Any:
        return batch_object(s.batches.get(tenant, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(tenant: Tenant, batch_id: str) -> Any:
        return batch_object(s.batches.cancel(tenant, batch_id))

    @app.get("/v1/batches")
    def list_batches(tenant: Tenant, limit: int = 20, after: str | None = None) -> Any:
        batches = s.batches.list(tenant, limit=min(max(limit, 1), 100) + 1, after=after)
        data = [batch_object(b) for b in batches[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(batches) > limit,
        }

    # -- one request at a time, asynchronously ---------------------------------------------
    @app.post("/v1/async/chat/completions", status_code=202, openapi_extra={"requestBody": _body_schema(CHAT_BODY)})
    async def submit(key: Key, request: Request) -> Any:
        tenant = key.tenant
        body = await _json(request, s.settings.gateway.max_body_bytes)
        if body.get("metadata") is not None:
            check_metadata(body["metadata"])
        try:
            req = request_from_body(body, tenant=tenant, allow_sluice_fields=True)
        except LineError as exc:
            raise ApiError(400, str(exc), exc.code) from exc
        stamp_key(key, req)
        admit(tenant, req)
        # The caller's W3C trace context continues through the pipeline (a bad one starts a new trace).
        trace = request.headers.get("traceparent")
        s.publisher.submit_request(req, traceparent=trace if trace and valid_traceparent(trace) else None)
        s.publisher.flush()  # acknowledged by the broker before the caller is told it is queued
        s.recent[req.request_id] = tenant
        while len(s.recent) > 100_000:
            s.recent.popitem(last=False)
        return {"id": req.request_id, "object": "async.request", "status": "queued", "created_at": unix(req.created_at)}

    # -- the synchronous tier: answered through the pipeline while the call waits ------------
    def sync_call() -> SyncCall:
        if s.waiter is None or s.capacity is None:
            raise ApiError(503, "synchronous requests are not enabled on this gateway", "unavailable")

        def submit(req: InferenceRequest, trace: str | None) -> None:
            s.publisher.submit_request(req, traceparent=trace)
            s.publisher.flush()

        return SyncCall(waiter=s.waiter, capacity=s.capacity, submit=submit, cancel=s.publisher.cancel)

    async def run_sync(
        request: Request,
        key: KeyInfo,
        req: InferenceRequest,
        stream: bool,
        render: Any,
        stream_render: Any,
    ) -> Any:
        call = sync_call()
        max_wait = call.max_wait(request, key, s.settings.gateway.max_wait_s)
        stamp_key(key, req)
        admit(key.tenant, req)
        call.admit(req, max_wait)
        req = call.prepare(req, max_wait)
        future = await call.start(req, request.headers.get("traceparent"))
        headers = {"x-request-id": req.request_id}
        if stream:
            return streaming(stream_result(call, request, req, future, max_wait, stream_render), req.request_id)
        result = await call.wait(request, req, future, max_wait)
        if result is None:
            # The caller is gone; this answer is for the access log only.
            return JSONResponse({"error": {"message": "client closed the request", "code": "cancelled"}}, 499)
        if result.status is not ResultStatus.SUCCEEDED:
            status, code, message = http_status(result)
            kind = "invalid_request_error" if status < 500 else "server_error"
            body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
            return JSONResponse(body, status, headers=headers)
        return JSONResponse(render(result), headers=headers)

    def sync_body(body: dict[str, Any], key: KeyInfo) -> tuple[Tier, bool, bool, dict[str, Any]]:
        body = dict(body)
        tier = tier_of(body.pop("service_tier", None), key, s.settings.gateway.service_tiers)
        stream = body.pop("stream", False)
        options = body.pop("stream_options", None)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean", "invalid_request")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise ApiError(400, "stream_options supports include_usage only", "invalid_request")
        return tier, stream, bool(options and options.get("include_usage")), body

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": _body_schema(SYNC_CHAT_BODY)})
    async def chat_completions(key: Key, request: Request) -> Any:
        body = await _json(request, s.settings.gateway.max_body_bytes)
        tier, stream, usage, body = sync_body(body, key)
        if body.get("metadata") is not None:
            check_metadata(body["metadata"])
        try:
            req = request_from_body(body, tenant=key.tenant, priority=tier.priority)
        except LineError as exc:
            raise ApiError(400, str(exc), exc.code) from exc

        def render(result: InferenceResult) -> dict[str, Any]:
            return {**chat_completion(result), "service_tier": tier.name}

        def render_stream(result: InferenceResult) -> list[str]:
            return sse_chat_chunks(result, tier.name, include_usage=usage)

        return await run_sync(request, key, req, stream, render, render_stream)

    @app.post("/v1/responses")
    async def responses(key: Key, request: Request) -> Any:
        body = await _json(request, s.settings.gateway.max_body_bytes)
        tier, stream, _, body = sync_body(body, key)
        if stream:
            raise ApiError(400, "stream is not supported on /v1/responses; use /v1/chat/completions", "invalid_request")
        try:
            req = request_from_responses_body(body, tenant=key.tenant, priority=tier.priority)
        except LineError as exc:
            raise ApiError(400, str(exc), exc.code) from exc

        def render(result: InferenceResult) -> dict[str, Any]:
            return {**response_object(result, body), "service_tier": tier.name}

        return await run_sync(request, key, req, False, render, None)

    @app.get("/v1/models")
    def list_models(tenant: Tenant) -> Any:
        # Every catalog model is open to every tenant; "auto" lets the router choose.
        names = ["auto", *s.models]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "sluice"} for n in names],
        }

    @app.get("/v1/models/{model}")
    def retrieve_model(tenant: Tenant, model: str) -> Any:
        if model != "auto" and model not in s.models:
            raise ApiError(404, f"the model {model!r} does not exist", "model_not_found")
        return {"id": model, "object": "model", "created": 0, "owned_by": "sluice"}

    @app.get("/v1/requests/{request_id}")
    def request_status(tenant: Tenant, request_id: str) -> Any:
        result = None
        state = None
        if s.lookups is not None:
            result = s.lookups.result(request_id, tenant)
            if result is None:
                state = s.lookups.latest_state(request_id, tenant)
                if state in ("succeeded", "failed", "expired", "cancelled"):
                    # The status event reached ClickHouse before the result row: it ends when the
                    # result can be served.
                    state = "running"
        if result is None and state is None:
            if s.recent.get(request_id) != tenant:
                raise ApiError(404, f"no request {request_id}", "not_found")
            state = "queued"
        if result is None:
            return {"id": request_id, "object": "async.request", "status": state, "response": None, "error": None}
        ok = result.status is ResultStatus.SUCCEEDED
        code, message = (None, None) if ok else error_code(result.error)
        return {
            "id": request_id,
            "object": "async.request",
            "status": result.status.value,
            "custom_id": result.custom_id,
            "batch_id": result.batch_id,
            "response": chat_completion(result) if ok else None,
            "error": None if ok else {"code": code, "message": message},
        }

    return app


async def _json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The JSON object of the body, read no further than ``max_bytes`` (413 past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyRefused(413, f"the request body is larger than {max_bytes} bytes", "request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyRefused(413, f"the request body is larger than {max_bytes} bytes", "request_too_large")
        chunks.append(chunk)
    return parse_json_body(b"".join(chunks), max_bytes)


def _body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    },
}
_METADATA = {"type": "object", "maxProperties": 16, "additionalProperties": {"type": "string", "maxLength": 512}}
# What the endpoints accept (OpenAI's chat-completions body as in batch lines, and Sluice's
# async fields); the handlers validate the same rules and answer 400 in OpenAI's shape.
CHAT_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 32768},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 32768},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "n": {"type": "integer", "enum": [1]},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]},
        "response_format": {"type": "object"},
        "metadata": _METADATA,
        "priority": {"type": "string", "enum": ["high", "normal", "low"]},
        "webhook_url": {"type": "string", "maxLength": 2048},
        "cache": {"type": "boolean"},
        "reply_to": {"type": "string", "maxLength": 249},
        "deadline": {"type": "string", "format": "date-time"},
    },
}
# The synchronous endpoint's body: OpenAI's chat-completions body, with service_tier and stream.
SYNC_CHAT_BODY: dict[str, Any] = {
    **CHAT_BODY,
    "properties": {
        **{
            k: v
            for k, v in CHAT_BODY["properties"].items()
            if k not in ("priority", "webhook_url", "reply_to", "deadline", "cache")
        },
        "service_tier": {"type": "string"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "user": {"type": "string"},
    },
}
BATCH_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["input_file_id"],
    "additionalProperties": False,
    "properties": {
        "input_file_id": {"type": "string"},
        "endpoint": {"type": "string", "enum": [e.value for e in Endpoint]},
        "completion_window": {"type": "string", "pattern": "^[0-9]+[smhd]$"},
        "metadata": _METADATA,
        "priority": {"type": "string", "enum": ["high", "normal", "low"]},
        "webhook_url": {"type": "string", "maxLength": 2048},
        "output_expires_after": {
            "type": "object",
            "required": ["anchor", "seconds"],
            "properties": {"anchor": {"type": "string", "enum": ["created_at"]}, "seconds": {"type": "integer"}},
        },
    },
}
