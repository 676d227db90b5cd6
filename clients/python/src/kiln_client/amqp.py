"""Jobs over AMQP (RabbitMQ), the RPC pattern Kiln's AMQP intake speaks:
publish a job to the jobs queue with ``reply_to`` and ``correlation_id``,
and await the result on an exclusive reply queue. Needs ``pika``
(``pip install 'kiln-client[amqp]'``)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, Optional

from .errors import KilnError
from .types import ExecResult


class AmqpJobs:
    """``with AmqpJobs("amqp://guest:guest@127.0.0.1:5672/%2f") as jobs:
    jobs.run({"runtime": "python", "code": "print(1)"})``"""

    def __init__(self, url: str, queue: str = "kiln.jobs") -> None:
        try:
            import pika  # type: ignore[import-not-found]
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise KilnError("the AMQP helper needs pika: pip install 'kiln-client[amqp]'", code="missing_dependency") from e
        self._pika = pika
        self.queue = queue
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        self.reply_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self._results: Dict[str, Dict[str, Any]] = {}
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if props.correlation_id:
            self._results[props.correlation_id] = json.loads(body)

    def publish(self, job: Dict[str, Any], priority: Optional[int] = None) -> str:
        """Publishes ``job`` (a job document, as for ``POST /v1/jobs``);
        returns its correlation id."""
        cid = str(uuid.uuid4())
        props = self._pika.BasicProperties(
            reply_to=self.reply_queue, correlation_id=cid, content_type="application/json", delivery_mode=2, priority=priority
        )
        self.channel.basic_publish("", self.queue, json.dumps(job).encode(), props)
        return cid

    def result(self, correlation_id: str, timeout_s: float = 900.0) -> ExecResult:
        """Waits for the reply to a published job."""
        import time

        end = time.monotonic() + timeout_s
        while correlation_id not in self._results:
            left = end - time.monotonic()
            if left <= 0:
                raise KilnError(f"no reply for {correlation_id} within {timeout_s} s", code="timeout")
            self.conn.process_data_events(time_limit=min(left, 1.0))
        return ExecResult.from_json(self._results.pop(correlation_id))

    def run(self, job: Dict[str, Any], timeout_s: float = 900.0) -> ExecResult:
        return self.result(self.publish(job), timeout_s)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "AmqpJobs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
