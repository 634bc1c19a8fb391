"""``python -m bench.passthrough BOOTSTRAP IN OUT``: the baseline for P1.

A raw consume→produce loop with confluent-kafka (same producer durability settings as Sluice,
no decoding), run as its own process like the Faust processor it is compared with.
"""

from __future__ import annotations

import signal
import sys
import threading

from core import clients
from core.settings import KafkaSettings


def main(argv: list[str]) -> None:
    bootstrap, source, sink = argv
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    consumer = clients.consumer(kafka, "passthrough", f"passthrough-{source}", **{"enable.auto.commit": True})
    producer = clients.producer(kafka, "passthrough")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer.subscribe([source])
    try:
        while not stop.is_set():
            for msg in consumer.consume(1000, timeout=0.05):
                if msg.error() is not None:
                    continue
                while True:
                    try:
                        producer.produce(sink, key=msg.key(), value=msg.value(), headers=msg.headers())
                        break
                    except BufferError:
                        producer.poll(0.01)
                consumer.store_offsets(msg)
            producer.poll(0)
    finally:
        producer.flush(10)
        consumer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
