"""Topic names, derived from one prefix, and explicit topic creation.

Topics are always created explicitly: auto-creation picks broker defaults (and on tansu,
4 partitions on any metadata request), which would silently change keying and ordering.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from core import clients
from core.catalog import Catalog
from core.errors import BrokerError
from core.settings import KafkaSettings, TenantSettings
from schemas import Priority

__all__ = ["PRIORITIES", "Topics", "ensure_topics", "reply_to_allowed"]

logger = logging.getLogger(__name__)

PRIORITIES: tuple[Priority, ...] = tuple(Priority)


@dataclass(frozen=True)
class Topics:
    prefix: str = "sluice."

    def requests(self, priority: Priority | str) -> str:
        return f"{self.prefix}requests.{priority}"

    def all_requests(self) -> list[str]:
        return [self.requests(p) for p in PRIORITIES]

    def model(self, name: str, priority: Priority | str) -> str:
        # One topic per model *and* priority: a consumer can then pause a full low-priority
        # buffer while still fetching high-priority requests (a shared topic would queue
        # high behind a low backlog in the partition log).
        return f"{self.prefix}model.{name}.{priority}"

    def model_topics(self, name: str) -> list[str]:
        return [self.model(name, p) for p in PRIORITIES]

    def gpu_group(self, model: str) -> str:
        """The consumer group of a model's GPU consumers (its lag is the model's queue)."""
        return f"{self.prefix}gpu-{model}"

    def priority_of(self, topic: str) -> Priority | None:
        """The priority a request or model topic carries (the one place a topic name is read
        back); None for any other topic."""
        if not topic.startswith((f"{self.prefix}requests.", f"{self.prefix}model.")):
            return None
        suffix = topic.rsplit(".", 1)[-1]
        return Priority(suffix) if suffix in Priority._value2member_map_ else None

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    @property
    def cost_metrics(self) -> str:
        return f"{self.prefix}cost-metrics"

    @property
    def status(self) -> str:
        return f"{self.prefix}status"

    @property
    def batches(self) -> str:
        """Batch status, keyed by batch id (compacted: the last state wins)."""
        return f"{self.prefix}batches"

    @property
    def dedupe(self) -> str:
        """Routed requests and completions, keyed by dedupe key (the processor's repartition topic)."""
        return f"{self.prefix}router.dedupe"

    @property
    def semantic(self) -> str:
        """Requests the semantic cache looks up, keyed by cache scope (tenant)."""
        return f"{self.prefix}router.semantic"

    @property
    def semantic_index(self) -> str:
        """Pending entries, completions and ticks of the semantic cache, keyed by cache scope."""
        return f"{self.prefix}router.semantic-index"

    @property
    def cancellations(self) -> str:
        return f"{self.prefix}cancellations"

    @property
    def quota_ledger(self) -> str:
        """Tokens each queued or running request holds against its tenant's quota, keyed by
        request id (compacted; a tombstone releases them)."""
        return f"{self.prefix}quota-ledger"

    def retry(self, level: int) -> str:
        return f"{self.prefix}retry.{level}"

    def table_changelog(self, app_id: str, table: str) -> str:
        # Faust's naming: "<app id>-<table>-changelog"; the app id carries the prefix.
        return f"{self.prefix}{app_id}-{table}-changelog"

    def result_topics(self, tenancy: TenantSettings, tenant: str, reply_to: str | None) -> list[str]:
        """Every topic a result of ``tenant`` goes to: the shared results topic, the tenant's own
        results topic if it has one, and the request's reply topic if the tenant may use it (the
        router refuses other reply topics; their failed results must not reach them either)."""
        out = [self.results]
        own = tenancy.results_topics.get(tenant)
        if own and own not in out:
            out.append(own)
        if reply_to and reply_to not in out and reply_to_allowed(tenancy, tenant, reply_to):
            out.append(reply_to)
        return out

    def pipeline(
        self,
        catalog: Catalog,
        app_id: str = "sluice-router",
        retry_levels: int = 3,
        tenancy: TenantSettings | None = None,
    ) -> dict[str, dict[str, str]]:
        """Every topic the pipeline needs, with its topic-level config."""
        topics: dict[str, dict[str, str]] = {t: {} for t in self.all_requests()}
        topics.update({t: {} for m in catalog for t in self.model_topics(m.name)})
        topics[self.results] = {}
        topics[self.dead_letter] = {}
        topics[self.cost_metrics] = {}
        topics[self.status] = {"cleanup.policy": "compact"}
        topics[self.dedupe] = {}
        topics[self.semantic] = {}
        topics[self.semantic_index] = {}
        topics[self.cancellations] = {"cleanup.policy": "compact"}
        topics[self.batches] = {"cleanup.policy": "compact"}
        topics[self.quota_ledger] = {"cleanup.policy": "compact"}
        for own in tenancy.results_topics.values() if tenancy else ():
            topics[own] = {}
        topics.update({self.retry(level): {} for level in range(retry_levels)})
        topics[self.table_changelog(app_id, "dedupe")] = {"cleanup.policy": "compact"}
        topics[self.table_changelog(app_id, "semantic")] = {"cleanup.policy": "compact"}
        return topics


def ensure_topics(kafka: KafkaSettings, topics: dict[str, dict[str, str]], timeout: float = 15.0) -> None:
    """Create missing topics; existing ones are left as they are."""
    refusals: list[KafkaError] = []

    def keep_refusals(err: KafkaError) -> None:
        if clients.classify(err) is clients.ClientErrorClass.CONFIGURATION:
            refusals.append(err)

    admin = clients.admin(kafka, "admin", on_error=keep_refusals)
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        # A refused login or handshake surfaces only through error_cb (served by poll); the
        # timeout itself says nothing.
        admin.poll(0.5)
        why = refusals[-1].str() if refusals else str(exc)
        raise BrokerError(f"cannot connect to Kafka at {kafka.bootstrap_servers}: {why}") from exc
    new = [
        NewTopic(
            name,
            num_partitions=kafka.partitions,
            replication_factor=kafka.replication_factor,
            config=config,
        )
        for name, config in topics.items()
        if name not in existing
    ]
    if not new:
        return
    for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
            logger.debug("created topic %s", name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise BrokerError(f"cannot create topic {name}: {exc}") from exc
    # Created is not yet visible: Apache Kafka's brokers learn new topics from the controller a
    # moment later, and a client that reads metadata at once would not find them.
    deadline = time.monotonic() + timeout
    waiting = {t.topic for t in new}
    while waiting and time.monotonic() < deadline:
        meta = admin.list_topics(timeout=timeout).topics
        waiting = {t for t in waiting if t not in meta or meta[t].error is not None or not meta[t].partitions}
        if waiting:
            time.sleep(0.05)
    if waiting:
        raise BrokerError(f"topics created but not visible after {timeout:.0f}s: {', '.join(sorted(waiting))}")


def reply_to_allowed(tenancy: TenantSettings, tenant: str, reply_to: str) -> bool:
    """Whether ``tenant`` may have results published to ``reply_to``."""
    return any(fnmatch.fnmatchcase(reply_to, pattern) for pattern in tenancy.reply_to_patterns.get(tenant, []))
