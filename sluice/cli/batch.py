"""``sluice gateway``, ``sluice keys create`` and ``sluice batch …``: the batch commands are
clients of the gateway's OpenAI-compatible HTTP API, exactly as any other client."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import ConfigError, SluiceError
from core.settings import Settings
from core.stackfile import read_stack_file
from sluice.cli.common import add_command, console, print_rows, settings_from

__all__ = ["register"]

_TERMINAL = {"completed", "failed", "expired", "cancelled"}


class _Api:
    """A small HTTP client of the gateway (URL from --gateway-url, SLUICE_GATEWAY_URL or the
    running stack; key from SLUICE_API_KEY or the stack's operator key)."""

    def __init__(self, settings: Settings, url: str | None) -> None:
        import httpx

        url = (
            url or os.environ.get("SLUICE_GATEWAY_URL") or (read_stack_file(settings.data_dir) or {}).get("gateway_url")
        )
        if not url:
            raise ConfigError("no gateway: start `sluice up`, or set SLUICE_GATEWAY_URL / --gateway-url")
        key = os.environ.get("SLUICE_API_KEY")
        if not key:
            path = settings.data_dir / "gateway.key"
            if not path.exists():
                raise ConfigError("no API key: set SLUICE_API_KEY (create one with `sluice keys create --tenant T`)")
            key = path.read_text().strip()
        self._http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers={"Authorization": f"Bearer {key}"})

    def call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, timeout=300, **kw)
        except httpx.HTTPError as exc:
            raise SluiceError(f"gateway unreachable: {exc}") from exc
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise SluiceError(f"HTTP {resp.status_code}: {message}")
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.call(method, path, **kw).json()


def _api(args: argparse.Namespace) -> _Api:
    return _Api(settings_from(args), args.gateway_url)


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--metadata {pair!r} must look like key=value")
        out[key] = value
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    api = _api(args)
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    with path.open("rb") as f:
        uploaded = api.json("POST", "/files", files={"file": (path.name, f)}, data={"purpose": "batch"})
    body: dict[str, Any] = {
        "input_file_id": uploaded["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": args.completion_window,
        "priority": args.priority,
        "metadata": _metadata(args.metadata) or None,
    }
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    batch = api.json("POST", "/batches", json=body)
    print(batch["id"])
    return 0


def _row(b: dict[str, Any]) -> list[object]:
    c = b["request_counts"]
    return [
        b["id"],
        b["status"],
        c["total"],
        c["completed"],
        c["failed"],
        b.get("output_file_id"),
        b.get("error_file_id"),
    ]


_COLUMNS = ["id", "status", "total", "completed", "failed", "output_file_id", "error_file_id"]


def cmd_status(args: argparse.Namespace) -> int:
    batch = _api(args).json("GET", f"/batches/{args.batch_id}")
    if args.format == "json":
        print(json.dumps(batch))
    else:
        print_rows(_COLUMNS, [_row(batch)], "table")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    data = _api(args).json("GET", "/batches", params={"limit": args.limit})["data"]
    print_rows(_COLUMNS, [_row(b) for b in data], args.format)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    batch = _api(args).json("POST", f"/batches/{args.batch_id}/cancel")
    console.print(f"{batch['id']}: {batch['status']}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    api = _api(args)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=console,
        transient=not sys.stdout.isatty(),
    ) as progress:
        task = progress.add_task(args.batch_id, total=None, failed=0)
        while True:
            batch = api.json("GET", f"/batches/{args.batch_id}")
            c = batch["request_counts"]
            progress.update(
                task,
                total=c["total"] or None,
                completed=c["completed"] + c["failed"],
                failed=c["failed"],
                description=f"{args.batch_id} {batch['status']}",
            )
            if batch["status"] in _TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise SluiceError(f"batch {args.batch_id} still {batch['status']} after {args.timeout}s")
            time.sleep(args.interval)
    console.print(f"{batch['id']}: {batch['status']}, {c['completed']} completed, {c['failed']} failed of {c['total']}")
    return 0 if batch["status"] == "completed" else 1


def _download(args: argparse.Namespace, which: str) -> int:
    api = _api(args)
    batch = api.json("GET", f"/batches/{args.batch_id}")
    file_id = batch.get(which)
    if not file_id:
        if batch["status"] not in _TERMINAL:
            raise SluiceError(f"batch {args.batch_id} is {batch['status']}: no files yet (try `sluice batch wait`)")
        return 0  # e.g. no errors: an empty error file is not written, as with OpenAI
    resp = api.call("GET", f"/files/{file_id}/content")
    if args.output:
        Path(args.output).write_bytes(resp.content)
        console.print(f"wrote {args.output}")
    else:
        sys.stdout.buffer.write(resp.content)
    return 0


def cmd_output(args: argparse.Namespace) -> int:
    return _download(args, "output_file_id")


def cmd_errors(args: argparse.Namespace) -> int:
    return _download(args, "error_file_id")


def cmd_keys_create(args: argparse.Namespace) -> int:
    from gateway.keys import KeyStore, keys_path

    tiers = {}
    for spec in args.tier:
        tier, _, priority = spec.partition("=")
        tiers[tier] = priority
    settings = settings_from(args)
    store = KeyStore(keys_path(settings))
    key = store.create(
        args.tenant, name=args.name, service_tiers=tiers, max_wait_s=args.max_wait, token_quota=args.token_quota
    )
    # The only time the key is shown: only its hash is stored.
    print(key)
    if args.token_quota is not None and not settings.tenants.key_quotas:
        print(
            "note: this key's token quota is enforced only where SLUICE_TENANTS__KEY_QUOTAS=true "
            "(gateway and routers); until then the gateway refuses its calls with 503",
            file=sys.stderr,
        )
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from core.metrics import serve_metrics
    from gateway.server import Gateway

    settings = settings_from(args)
    serve_metrics(settings.metrics)
    host = args.host or settings.gateway.host
    port = args.port if args.port is not None else (settings.gateway.port or 8000)
    console.print(f"Sluice gateway on http://{host}:{port} (OpenAI base_url: http://{host}:{port}/v1)")
    Gateway(settings).serve(host, port)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(sub, "gateway", cmd_gateway, "serve the OpenAI-compatible Batch API, async requests and webhooks")
    sp.add_argument("--host", default=None, help="default: SLUICE_GATEWAY__HOST (127.0.0.1)")
    sp.add_argument("--port", type=int, default=None, help="default: SLUICE_GATEWAY__PORT, else 8000")

    keys = sub.add_parser("keys", help="API keys of the gateway", description="API keys: each maps to a tenant")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kp = keys_sub.add_parser("create", help="create a key for a tenant; printed once, stored hashed")
    kp.add_argument("--tenant", required=True)
    kp.add_argument("--name", default="", help="a note to recognise the key by")
    kp.add_argument(
        "--tier",
        action="append",
        default=[],
        metavar="TIER=PRIORITY",
        help="map an OpenAI service_tier to a priority for this key (e.g. flex=normal); repeatable",
    )
    kp.add_argument("--max-wait", type=float, default=None, help="seconds a synchronous call of this key may wait")
    kp.add_argument(
        "--token-quota",
        type=int,
        default=None,
        help="most tokens (prompt estimate + max_tokens) this key's requests may have queued or running",
    )
    kp.set_defaults(fn=cmd_keys_create)

    batch = sub.add_parser("batch", help="OpenAI-style batch jobs", description="batch jobs through the gateway")
    bsub = batch.add_subparsers(dest="batch_command", required=True)

    def cmd(name: str, fn: Any, help: str, *, batch_id: bool = True) -> argparse.ArgumentParser:
        p = bsub.add_parser(name, help=help, description=help)
        if batch_id:
            p.add_argument("batch_id")
        p.set_defaults(fn=fn)
        p.add_argument("--gateway-url", default=None, help="default: SLUICE_GATEWAY_URL or the running stack's")
        return p

    p = cmd("submit", cmd_submit, "upload an OpenAI batch JSONL file and start a batch; prints its id", batch_id=False)
    p.add_argument("file")
    p.add_argument("--priority", choices=["high", "normal", "low"], default="low")
    p.add_argument("--completion-window", default="24h", help="e.g. 24h, 90m; each request's deadline")
    p.add_argument("--metadata", action="append", help="key=value (repeatable)")
    p.add_argument("--webhook-url", default=None, help="called (signed) when the batch ends")
    p = cmd("status", cmd_status, "a batch's state and request counts")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p = cmd("wait", cmd_wait, "follow a batch with a progress bar until it ends (exit 0 if completed)")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p = cmd("output", cmd_output, "the output file: one OpenAI batch output line per succeeded request")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    p = cmd("errors", cmd_errors, "the error file: one line per failed request, with its error code")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    cmd("cancel", cmd_cancel, "cancel a batch: queued requests are skipped, finished ones kept")
    p = cmd("list", cmd_list, "the tenant's batches, newest first", batch_id=False)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--format", choices=["table", "json"], default="table")
