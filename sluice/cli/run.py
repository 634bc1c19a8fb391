"""``sluice demo`` and ``sluice up``: the embedded stack."""

from __future__ import annotations

import argparse
import signal

from core.engines import engine_names
from sluice.cli.common import add_command, console, settings_from

__all__ = ["register"]


def cmd_demo(args: argparse.Namespace) -> int:
    from sluice.local.demo import run_demo

    return run_demo(settings_from(args), console, max_tokens=args.max_tokens)


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (what `kill` and supervisors send) stops the stack like Ctrl-C does.
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    from sluice.local.stack import LocalStack

    settings = settings_from(args)
    if args.engine:
        settings = settings.evolve(engine={"kind": args.engine})
    # The embedded broker takes a free port unless one is configured (9092 may be a host's own
    # Kafka); clients find it through stack.json.
    configured = "bootstrap_servers" in settings.kafka.model_fields_set
    port = settings.kafka.bootstrap_servers.rpartition(":")[2] if configured else ""
    stack = LocalStack(
        settings,
        embedded_broker=not args.external_kafka,
        broker_port=int(port) if port and not args.external_kafka else None,
        replicas=args.replicas,
        routers=args.routers,
        durable=not args.ephemeral,
        run_gateway=not args.no_gateway,
        broker=args.broker,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with console.status("starting the local stack…"):
            stack.start()
            stack.ready.wait(90)
        if args.external_kafka:
            broker = "your cluster"
        elif stack.kafka is not None:
            broker = f"Apache Kafka {stack.kafka.version}, durable on local disk"
        else:
            broker = "tansu, " + ("in memory (--ephemeral)" if args.ephemeral else "durable on local SeaweedFS")
        console.print(
            f"[green]Sluice is up[/]: Kafka {stack.bootstrap_servers} ({broker}), "
            f"ClickHouse {settings.clickhouse_url()}, "
            f"queries/metrics {stack.query_server.url if stack.query_server else '-'}, "
            f"gateway (OpenAI-compatible Batch API) {stack.gateway_url or '-'}; "
            f"metrics (/metrics, /healthz) {', '.join(f'{k} {v}' for k, v in stack.metrics_urls.items()) or '-'}; "
            f"logs in {stack.log_dir}. Ctrl-C stops.",
            soft_wrap=True,
        )
        stack.wait()
    except KeyboardInterrupt:
        console.print("stopping: consumers drain, then the router, the sink, the broker…")
    finally:
        # No second signal may cut the ordered stop short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
    console.print("stopped")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(sub, "demo", cmd_demo, "run the whole pipeline once on the embedded stack with a real model")
    sp.add_argument("--max-tokens", type=int, default=48)

    sp = add_command(sub, "up", cmd_up, "run the local stack in the foreground until Ctrl-C")
    sp.add_argument("--engine", choices=engine_names(), default=None)
    sp.add_argument("--replicas", type=int, default=1, help="GPU consumers per model, in one consumer group")
    sp.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router workers, in one group: they share the request and dedupe-table partitions",
    )
    sp.add_argument(
        "--ephemeral",
        action="store_true",
        help="keep the broker in memory (lost when it stops); default: durable, under SLUICE_DATA_DIR",
    )
    sp.add_argument(
        "--external-kafka", action="store_true", help="use SLUICE_KAFKA__BOOTSTRAP_SERVERS, start no broker"
    )
    sp.add_argument(
        "--broker",
        choices=["auto", "kafka", "tansu"],
        default=None,
        help="embedded broker: Apache Kafka from local jars, or tansu; default SLUICE_LOCAL__BROKER (auto: "
        "Apache Kafka for a durable stack where Java and its jars are present, else tansu)",
    )
    sp.add_argument("--no-gateway", action="store_true", help="do not start the HTTP gateway")
