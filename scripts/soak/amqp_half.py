"""The AMQP half of the soak: an ordinary AMQP client (pika, no Kiln code)
publishes jobs to the jobs queue that two `kiln serve` executors consume,
keeps a ledger by message id, and collects every reply; the orchestrator
meanwhile kills an executor twice, restarts the broker, kills agents inside
sandboxes and sends a burst of poison. At the end the ledger is checked
against what docs/amqp.md promises.

The producer publishes persistent messages with `message_id` (the job id;
the body carries none, so Kiln takes it from the message), a
`correlation_id`, `reply_to` = a durable reply queue, `mandatory`, and
waits for the broker's confirm of each. A publication interrupted by a
lost connection is sent again: the producer cannot know whether the broker
had it, and such ids are marked "sent twice" (docs/amqp.md: a message sent
again is answered again).
"""

import collections
import hashlib
import json
import threading
import time

import pika

JSON = "application/json"


class Names:
    def __init__(self, tag):
        base = f"kiln.soak.{tag}"
        self.queue = f"{base}.jobs"
        self.dlx = f"{base}.dlx"
        self.dlq = f"{base}.dead"
        self.replies = f"{base}.replies"

    def serve_args(self, url):
        return [
            "--amqp-url", url,
            "--amqp-queue", self.queue,
            "--amqp-dead-letter-exchange", self.dlx,
            "--amqp-dead-letter-queue", self.dlq,
            "--amqp-reconnect-max-ms", "2000",
            "--amqp-max-message-bytes", str(MAX_MESSAGE_BYTES),
        ]

    def declare(self, ch):
        """The topology as `kiln serve` declares it (same arguments, or the
        broker refuses), and the producer's durable reply queue."""
        ch.exchange_declare(self.dlx, exchange_type="fanout", durable=True)
        ch.queue_declare(self.dlq, durable=True)
        ch.queue_bind(self.dlq, self.dlx)
        ch.queue_declare(self.queue, durable=True, arguments={
            "x-dead-letter-exchange": self.dlx,
            "x-queue-type": "classic",
            "x-max-priority": 9,
        })
        ch.queue_declare(self.replies, durable=True)

    def delete(self, url):
        try:
            conn = pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPError:
            return
        ch = conn.channel()
        for q in (self.queue, self.dlq, self.replies):
            try:
                ch.queue_delete(q)
            except pika.exceptions.AMQPError:
                ch = conn.channel()
        try:
            ch.exchange_delete(self.dlx)
        except pika.exceptions.AMQPError:
            pass
        conn.close()


# Bodies above this are dead-lettered unread (`--amqp-max-message-bytes`);
# the oversize poison is twice as large.
MAX_MESSAGE_BYTES = 65536


def job_for(i, rng):
    """Job number `i`: (body, expected stdout). A mix of Bash arithmetic,
    Python hashing and a few slower jobs that widen the window in which a
    kill finds jobs in flight."""
    kind = rng.random()
    if kind < 0.45:
        a, b = rng.randrange(1, 10**6), rng.randrange(1, 10**6)
        return {"runtime": "bash", "code": f"echo $(( {a} * {b} + {i} ))"}, f"{a * b + i}\n"
    if kind < 0.90:
        word = f"kiln-soak-{i}-{rng.randrange(10**9)}"
        return ({"runtime": "python",
                 "code": f"import hashlib\nprint(hashlib.sha256(b'{word}').hexdigest())"},
                hashlib.sha256(word.encode()).hexdigest() + "\n")
    ms = rng.randrange(100, 400)
    return ({"runtime": "bash", "code": f"sleep 0.{ms:03d}; echo slept {ms} {i}"},
            f"slept {ms} {i}\n")


POISON_KINDS = [
    # (name, body maker, the field Kiln must name)
    ("not-json", lambda pid: b"{this is not json", "body"),
    ("unknown-runtime",
     lambda pid: json.dumps({"runtime": "cobol-85", "code": "DISPLAY 1"}).encode(), "runtime"),
    ("oversize",
     lambda pid: json.dumps({"runtime": "bash",
                             "code": "echo " + "x" * (2 * MAX_MESSAGE_BYTES)}).encode(), "body"),
    ("absurd-limits",
     lambda pid: json.dumps({"runtime": "bash", "code": "echo 1",
                             "limits": {"memory_mb": 10**9}}).encode(), "limits.memory_mb"),
]


class Ledger:
    """What was sent and what came back, by job id."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = {}          # id -> {"expected": str, "corr": str}
        self.poison = {}        # id -> {"kind": str, "field": str, "corr": str}
        self.sent_twice = set()
        self.replies = collections.defaultdict(list)
        self.unknown = []       # replies for ids never sent
        self.published = 0
        self.answered_ids = set()

    def answered(self):
        with self.lock:
            return len(self.answered_ids)

    def expected_ids(self):
        with self.lock:
            return set(self.jobs) | set(self.poison)

    def record(self, body, props, redelivered):
        try:
            result = json.loads(body)
        except ValueError:
            result = {"unparsable": body[:200].decode(errors="replace")}
        rid = result.get("id") or props.message_id
        r = {
            "result": result,
            "message_id": props.message_id,
            "correlation_id": props.correlation_id,
            "content_type": props.content_type,
            "delivery_mode": props.delivery_mode,
            "headers": {k: (v.decode() if isinstance(v, bytes) else v)
                        for k, v in (props.headers or {}).items()},
            "redelivered": redelivered,
            "timestamp": props.timestamp,
            "received": round(time.time(), 3),
        }
        with self.lock:
            if rid in self.jobs or rid in self.poison:
                self.replies[rid].append(r)
                self.answered_ids.add(rid)
            else:
                self.unknown.append(r)


class Producer:
    """The publisher and the reply collector, each a thread with its own
    connection, both reconnecting (bounded) when the broker goes away."""

    def __init__(self, url, names, ledger, jobs, window, rate, deadline, log):
        self.url = url
        self.names = names
        self.ledger = ledger
        self.todo = collections.deque(jobs)   # (id, body, expected)
        self.urgent = collections.deque()      # poison: (id, body, kind, field)
        self.window = window
        self.rate = rate
        self.deadline = deadline
        self.log = log
        self.stop = threading.Event()
        self.errors = []
        self.reconnects = {"publisher": 0, "collector": 0}
        self.publisher = threading.Thread(target=self._guard(self._publish), daemon=True)
        self.collector = threading.Thread(target=self._guard(self._collect), daemon=True)

    def _guard(self, f):
        def run():
            try:
                f()
            except Exception as e:  # reported by the orchestrator
                self.errors.append(f"{f.__name__}: {e!r}")
        return run

    def start(self):
        self.publisher.start()
        self.collector.start()

    def done_publishing(self):
        return not self.todo and not self.urgent

    def _connect(self, who):
        """A connection, retried every 0.5 s until the deadline."""
        while time.monotonic() < self.deadline and not self.stop.is_set():
            try:
                p = pika.URLParameters(self.url)
                p.heartbeat = 30
                p.blocked_connection_timeout = 60
                return pika.BlockingConnection(p)
            except pika.exceptions.AMQPError:
                self.reconnects[who] += 1
                time.sleep(0.5)
        raise RuntimeError(f"{who}: no connection to the broker before the deadline")

    def _publish(self):
        conn, ch = None, None
        t0 = time.monotonic()
        sent = 0
        while not self.stop.is_set():
            if self.done_publishing():
                break
            if time.monotonic() > self.deadline:
                raise RuntimeError("publishing did not finish before the deadline")
            if conn is None:
                conn = self._connect("publisher")
                ch = conn.channel()
                ch.confirm_delivery()
            try:
                # Bounded in-flight: at most `window` jobs unanswered, and at
                # most `rate` jobs per second when a rate is set.
                poison = bool(self.urgent)
                if poison:
                    mid, body, kind, field = self.urgent[0]
                    corr = f"corr-{mid}"
                else:
                    if self.ledger.published - self.ledger.answered() >= self.window or (
                            self.rate and sent >= self.rate * (time.monotonic() - t0)):
                        conn.sleep(0.01)
                        continue
                    mid, body, expected = self.todo[0]
                    corr = f"corr-{mid}"
                props = pika.BasicProperties(
                    content_type=JSON, delivery_mode=2, message_id=mid,
                    correlation_id=corr, reply_to=self.names.replies)
                with self.ledger.lock:
                    if poison:
                        self.ledger.poison.setdefault(mid, {"kind": kind, "field": field,
                                                            "corr": corr})
                    else:
                        self.ledger.jobs.setdefault(mid, {"expected": expected, "corr": corr})
                self._maybe_sent = mid
                ch.basic_publish("", self.names.queue, body, props, mandatory=True)
                self._maybe_sent = None
                if poison:
                    self.urgent.popleft()
                else:
                    self.todo.popleft()
                    sent += 1
                with self.ledger.lock:
                    self.ledger.published += 1
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
                    pika.exceptions.StreamLostError, pika.exceptions.ConnectionClosed,
                    pika.exceptions.ChannelClosed, pika.exceptions.NackError) as e:
                # Maybe the broker has it, maybe not: send it again, and
                # remember that this id may be answered twice.
                if self._maybe_sent is not None:
                    with self.ledger.lock:
                        self.ledger.sent_twice.add(self._maybe_sent)
                    self.log(f"publish of {self._maybe_sent} interrupted ({type(e).__name__});"
                             " sending it again")
                self._maybe_sent = None
                try:
                    conn.close()
                except Exception:
                    pass
                conn, ch = None, None
                time.sleep(0.25)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    _maybe_sent = None

    def _collect(self):
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                conn = self._connect("collector")
            except RuntimeError:
                return
            try:
                ch = conn.channel()
                ch.basic_qos(prefetch_count=500)

                def on_reply(ch, method, props, body):
                    self.ledger.record(body, props, method.redelivered)
                    ch.basic_ack(method.delivery_tag)

                ch.basic_consume(self.names.replies, on_reply)
                while not self.stop.is_set():
                    conn.process_data_events(time_limit=0.2)
                conn.close()
                return
            except (pika.exceptions.AMQPError, pika.exceptions.StreamLostError):
                self.reconnects["collector"] += 1
                time.sleep(0.25)


def drain_dead_letters(url, names, limit=100000):
    """Every message in the dead-letter queue: (body, headers)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    out = []
    for _ in range(limit):
        method, props, body = ch.basic_get(names.dlq, auto_ack=True)
        if method is None:
            break
        out.append((body, {k: (v.decode() if isinstance(v, bytes) else v)
                           for k, v in (props.headers or {}).items()}))
    conn.close()
    return out


def queue_depth(url, queue):
    """Ready messages in `queue` (passive declare)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    n = conn.channel().queue_declare(queue, passive=True).method.message_count
    conn.close()
    return n


def check(ledger, dead_letters, agents_killed, windows, node_capacity):
    """The ledger against docs/amqp.md's promise. `windows`: the executor
    kills and broker restarts as (what, epoch start, epoch end). Returns
    (report, failures)."""
    fails = []
    rep = {}

    def distinct(replies):
        # A reply the broker redelivered to the producer (its own connection
        # dropped before its ack) is the same publication, not a second one.
        return max(1, sum(1 for r in replies if not r["redelivered"])) if replies else 0

    props_bad = []
    outcomes = collections.Counter()
    wrong, internal, dup_ids, extra, extra_sent_twice, missing = [], [], [], 0, 0, []
    for mid, job in ledger.jobs.items():
        rs = ledger.replies.get(mid, [])
        n = distinct(rs)
        if n == 0:
            missing.append(mid)
            continue
        if n > 1:
            if mid in ledger.sent_twice:
                extra_sent_twice += n - 1
            else:
                dup_ids.append(mid)
                extra += n - 1
        for r in rs:
            res = r["result"]
            outcomes[res.get("outcome")] += 1
            if (r["message_id"] != mid or r["correlation_id"] != job["corr"]
                    or r["content_type"] != JSON or r["delivery_mode"] != 2
                    or r["headers"].get("x-kiln-job-id") != mid
                    or r["headers"].get("x-kiln-outcome") != res.get("outcome")):
                props_bad.append((mid, {k: r[k] for k in ("message_id", "correlation_id",
                                                            "content_type", "headers")}))
            if res.get("outcome") == "ok" and res.get("stdout") == job["expected"]:
                continue
            if res.get("outcome") == "internal":
                internal.append((mid, res.get("message")))
                continue
            wrong.append((mid, res.get("outcome"), res.get("stdout", "")[:80],
                          job["expected"][:80], res.get("message")))
    rep["jobs"] = len(ledger.jobs)
    rep["answered"] = len(ledger.jobs) - len(missing)
    rep["outcomes"] = dict(outcomes)
    rep["ids_with_more_than_one_result"] = len(dup_ids)
    rep["extra_results"] = extra
    rep["sent_twice_by_the_producer"] = len(ledger.sent_twice)
    rep["extra_results_of_ids_sent_twice"] = extra_sent_twice
    rep["internal_results"] = internal[:20]
    rep["duplicates"] = [
        {"id": m, "replies": [{k: r[k] for k in ("timestamp", "received", "redelivered")}
                              | {"outcome": r["result"].get("outcome")}
                              for r in ledger.replies[m]]}
        for m in dup_ids[:20]]
    rep["agents_killed"] = agents_killed
    if missing:
        fails.append(f"{len(missing)} jobs never answered, e.g. {missing[:5]}")
    if wrong:
        fails.append(f"{len(wrong)} wrong results, e.g. {wrong[:5]}")
    if props_bad:
        fails.append(f"{len(props_bad)} replies with wrong properties, e.g. {props_bad[:3]}")
    # A job whose sandbox's agent the soak killed is answered `internal`;
    # nothing else may be.
    if len(internal) > agents_killed:
        fails.append(f"{len(internal)} internal results but only {agents_killed} agents killed:"
                     f" {internal[:5]}")
    # docs/amqp.md: a second result is possible only when a job message's
    # result was published but its ack did not reach the broker, and the
    # message then went to a node that does not know it: a node killed (at
    # most what it held, its capacity) or the broker restarted (at most what
    # both nodes held). Each duplicate must straddle such an event: its
    # first result came before the event ended, the second after it began.
    kills = sum(1 for w in windows if w[0] == "kill-executor")
    restarts = sum(1 for w in windows if w[0] == "restart-broker")
    bound = (kills + 2 * restarts) * node_capacity
    if extra > bound:
        fails.append(f"{extra} duplicate results ({len(dup_ids)} ids, e.g. {dup_ids[:5]});"
                     f" at most {bound} are possible ({kills} kills, {restarts} broker restarts,"
                     f" capacity {node_capacity} a node)")
    unexplained = []
    for m in dup_ids:
        got = sorted(r["received"] for r in ledger.replies[m] if not r["redelivered"])
        if not any(got[0] <= end and got[-1] >= start for _, start, end in windows):
            unexplained.append((m, got))
    rep["duplicates_outside_a_documented_window"] = len(unexplained)
    if unexplained:
        fails.append(f"{len(unexplained)} duplicates not around an executor kill or a broker"
                     f" restart: {unexplained[:5]}")

    # Poison: a `rejected` reply naming the field, and one dead letter with
    # the reason in its headers.
    p_missing, p_wrong, dl_count = [], [], collections.Counter()
    for mid, p in ledger.poison.items():
        rs = ledger.replies.get(mid, [])
        if not rs:
            p_missing.append(mid)
        for r in rs:
            res = r["result"]
            if res.get("outcome") != "rejected" or not str(res.get("message", "")).startswith(
                    p["field"] + ":"):
                p_wrong.append((mid, p["kind"], res.get("outcome"), res.get("message")))
    dl_other, dl_bad = [], []
    for body, h in dead_letters:
        mid = h.get("x-kiln-job-id")
        if mid not in ledger.poison:
            dl_other.append((mid, h.get("x-kiln-error"), body[:80]))
            continue
        dl_count[mid] += 1
        p = ledger.poison[mid]
        if h.get("x-kiln-error-field") != p["field"] or not str(
                h.get("x-kiln-error", "")).startswith(p["field"] + ":"):
            dl_bad.append((mid, p["kind"], h.get("x-kiln-error-field"), h.get("x-kiln-error")))
    no_dl = [m for m in ledger.poison if dl_count[m] == 0]
    dl_dups = sum(c - 1 for c in dl_count.values() if c > 1)
    p_dups = sum(distinct(ledger.replies.get(m, [])) - 1 for m in ledger.poison
                 if m not in ledger.sent_twice and ledger.replies.get(m))
    kinds = collections.Counter(p["kind"] for p in ledger.poison.values())
    rep["poison"] = {
        "sent": dict(kinds),
        "dead_lettered": sum(dl_count.values()),
        "rejected_replies": sum(len(ledger.replies.get(m, [])) for m in ledger.poison),
        "duplicate_dead_letters": dl_dups,
        "duplicate_rejected_replies": p_dups,
        "reasons": sorted({h.get("x-kiln-error", "")[:90] for _, h in dead_letters}),
    }
    if p_missing:
        fails.append(f"{len(p_missing)} poison messages without a reply: {p_missing[:5]}")
    if p_wrong:
        fails.append(f"poison answered wrongly: {p_wrong[:5]}")
    if no_dl:
        fails.append(f"{len(no_dl)} poison messages not dead-lettered: {no_dl[:5]}")
    if dl_bad:
        fails.append(f"dead letters with the wrong reason: {dl_bad[:5]}")
    if dl_other:
        fails.append(f"{len(dl_other)} dead letters that are not the soak's poison: {dl_other[:5]}")
    if dl_dups + p_dups + extra > bound:
        fails.append(f"duplicates past the documented window: {dl_dups} dead letters,"
                     f" {p_dups} rejected replies, {extra} results")
    if ledger.unknown:
        fails.append(f"{len(ledger.unknown)} replies for ids never sent: "
                     f"{[r['result'] for r in ledger.unknown[:3]]}")
    return rep, fails
