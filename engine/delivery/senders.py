"""Sending one delivery to one destination: a FHIR server, an ERP over REST, or a file.

A sender's ``send(delivery)`` returns a Deferred that fires with an ``outbox.Result``: OK,
TRANSIENT (retry later: timeouts, refused connections, 5xx, 408, 429) or PERMANENT (dead-letter:
other 4xx, a Bundle the server refuses). Senders never raise for a failed delivery and never log
message content. The HTTP senders (and Tryton's, ``engine.delivery.tryton``) each compose one
``HttpClient`` (``engine.delivery.http``); the file sender writes in a thread pool handed down
from ``serve``. A new destination type is a class here with ``send`` (and ``close``), and a line in
``sender_for``.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import orjson
from twisted.internet import defer

from ..stamps import parse_iso
from . import ndjson
from .destinations import Destination
from .finance import events
from .http import NETWORK_ERRORS, TokenError, HttpClient, classify_status, failure_result, retry_after
from .messaging import message_bundle
from .outbox import OK, PERMANENT, TRANSIENT, Result
from .tryton import TrytonSender

FHIR_JSON = b"application/fhir+json"
JSON = b"application/json"


def transaction_outcome(body: bytes) -> tuple[str, str]:
    """Look inside a transaction-response Bundle: every entry must have succeeded."""
    try:
        bundle = json.loads(body)
    except ValueError:
        return OK, ""
    worst = OK
    problems = []
    for index, entry in enumerate(bundle.get("entry", []) or []):
        status_text = (entry.get("response") or {}).get("status", "")
        try:
            status = int(status_text.split()[0])
        except (ValueError, IndexError):
            continue
        outcome = classify_status(status)
        if outcome != OK:
            problems.append(f"entry {index}: {status_text}")
            worst = PERMANENT if PERMANENT in (worst, outcome) else TRANSIENT
    return worst, "; ".join(problems)


def resources_in_order(bundle: dict) -> list[tuple[str, dict]]:
    """For 'resources' mode: each entry as (Type/id, resource), with urn:uuid references rewritten."""
    urls = {}
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        resource_id = entry["fullUrl"].rsplit(":", 1)[-1]
        urls[entry["fullUrl"]] = f"{resource['resourceType']}/{resource_id}"

    def rewrite(value):
        if isinstance(value, dict):
            return {k: (urls.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    out = []
    for entry in bundle.get("entry", []):
        url = urls[entry["fullUrl"]]
        resource = rewrite(entry["resource"])
        resource["id"] = url.split("/", 1)[1]
        out.append((url, resource))
    return out


class FhirSender:
    """Delivers Bundles to a FHIR server: one transaction, or one PUT per resource."""

    HEADERS = {b"Content-Type": FHIR_JSON, b"Accept": FHIR_JSON, b"User-Agent": b"hl7bridge"}

    def __init__(self, destination: Destination, reactor, http: HttpClient | None = None):
        self.destination = destination
        self.http = http or HttpClient(destination, reactor)

    def request(self, method: bytes, url: str, body: bytes, extra: dict | None = None):
        return self.http.request(method, url, body, {**self.HEADERS, **(extra or {})})

    @defer.inlineCallbacks
    def send(self, delivery):
        try:
            if self.destination.payload == "message":
                result = yield self._message(delivery.bundle)
            elif self.destination.mode == "transaction":
                result = yield self._transaction(delivery.bundle)
            else:
                result = yield self._resources(delivery.bundle)
        except (*NETWORK_ERRORS, TokenError) as exc:
            result = failure_result(exc, self.destination)
        return result

    def classify(self, status: int) -> str:
        # With OAuth2 a 401 means the token expired or was revoked: a new one may well work.
        if status == 401 and self.destination.oauth2:
            return TRANSIENT
        return classify_status(status)

    @defer.inlineCallbacks
    def _transaction(self, bundle_json: str):
        status, body, after = yield self.request(b"POST", self.destination.url, bundle_json.encode())
        outcome = self.classify(status)
        text = body.decode("utf-8", errors="replace")
        if outcome == OK:
            outcome, problems = transaction_outcome(body)
            if outcome != OK:
                return Result(outcome, status, text, error=f"transaction entries failed: {problems}"[:300])
            return Result(OK, status, text)
        return Result(outcome, status, text, retry_after(after), error=f"HTTP {status}")

    @defer.inlineCallbacks
    def _message(self, bundle_json: str):
        """A FHIR message, to the server's $process-message operation."""
        body = json.dumps(message_bundle(json.loads(bundle_json), self.destination.name, self.destination.url))
        status, answer, after = yield self.request(b"POST", f"{self.destination.url}/$process-message", body.encode())
        outcome = self.classify(status)
        text = answer.decode("utf-8", errors="replace")
        if outcome == OK:
            return Result(OK, status, text)
        return Result(outcome, status, text, retry_after(after), error=f"HTTP {status} on $process-message")

    @defer.inlineCallbacks
    def _resources(self, bundle_json: str):
        status = None
        for url, resource in resources_in_order(json.loads(bundle_json)):
            status, body, after = yield self.request(b"PUT", f"{self.destination.url}/{url}", orjson.dumps(resource))
            outcome = self.classify(status)
            if outcome != OK:
                text = body.decode("utf-8", errors="replace")
                return Result(outcome, status, text, retry_after(after), error=f"HTTP {status} on PUT {url.split('/')[0]}")
        return Result(OK, status, "")

    def close(self):
        return self.http.close()


def shape(template, event: dict):
    """An erp-http body: the template with every "=a.b.c" text replaced by that field of the event."""
    if isinstance(template, dict):
        return {key: shape(value, event) for key, value in template.items()}
    if isinstance(template, list):
        return [shape(value, event) for value in template]
    if isinstance(template, str) and template.startswith("="):
        value = event
        for part in template[1:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value
    return template


class ErpHttpSender:
    """POSTs each finance event (shaped by the destination's body template) as JSON.

    Each request carries ``Idempotency-Key: <event_id>``: if a delivery is retried after some of
    its events went through, the ERP can recognise the ones it already has.
    """

    HEADERS = {b"Content-Type": JSON, b"Accept": JSON, b"User-Agent": b"hl7bridge"}

    def __init__(self, destination: Destination, reactor, http: HttpClient | None = None):
        self.destination = destination
        self.http = http or HttpClient(destination, reactor)

    @defer.inlineCallbacks
    def send(self, delivery):
        status = None
        try:
            for event in events(json.loads(delivery.bundle), delivery.message_id, delivery.control_id,
                                delivery.discriminator):
                body = shape(self.destination.body, event) if self.destination.body else event
                status, content, after = yield self.http.request(
                    b"POST", self.destination.url, json.dumps(body).encode(),
                    {**self.HEADERS, b"Idempotency-Key": event["event_id"].encode()},
                )
                outcome = classify_status(status)
                if outcome != OK:
                    return Result(outcome, status, content.decode("utf-8", errors="replace"), retry_after(after),
                                  error=f"HTTP {status} on {event['event']}")
        except (*NETWORK_ERRORS, TokenError) as exc:
            return failure_result(exc, self.destination)
        return Result(OK, status, "")

    def close(self):
        return self.http.close()


class FileSender:
    """Appends each Bundle (or each finance event) as one line of NDJSON to
    DIRECTORY/YYYY-MM-DD.ndjson, fsynced before the delivery counts as delivered.

    Every record carries its delivery ID. A torn record left by a crash is cut off and kept aside
    before anything is appended (``engine.delivery.ndjson``), and a delivery that is tried again (after a
    failure, or resumed after a crash) first looks whether its records already reached the file:
    each delivery is in the file once, whole. Appends are serialized (one lock per destination),
    so records never interleave; the fsync that makes a record durable is shared with the records
    appended meanwhile (``ndjson.GroupSync``).
    """

    def __init__(self, destination: Destination, run_blocking, clock=None):
        self.destination = destination
        self.run_blocking = run_blocking  # run(fn, *args) -> Deferred, in a thread pool of serve's
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.lock = threading.Lock()
        self.syncs = ndjson.GroupSync()
        # For /metrics: torn records set aside, and resumed deliveries found already written.
        self.counters = {"torn_records_set_aside": 0, "already_written": 0}

    def start(self) -> list[tuple[str, int]]:
        """Repair every day file of the directory (at start-up); returns [(file, bytes set aside)]."""
        with self.lock:
            repaired = ndjson.repair_directory(self.destination.directory)
        self.counters["torn_records_set_aside"] += len(repaired)
        return repaired

    def send(self, delivery):
        return self.run_blocking(self.write, delivery)

    def write(self, delivery) -> Result:
        """Write one delivery's records (blocking: run in a thread)."""
        directory = self.destination.directory
        try:
            bundle = json.loads(delivery.bundle)
            if self.destination.payload == "finance-events":
                records = events(bundle, delivery.message_id, delivery.control_id, delivery.discriminator)
            elif self.destination.payload == "message":
                records = [{"message_id": delivery.message_id, "control_id": delivery.control_id,
                            "bundle": message_bundle(bundle, self.destination.name)}]
            else:
                records = [{"message_id": delivery.message_id, "control_id": delivery.control_id, "bundle": bundle}]
            with self.lock:
                directory.mkdir(parents=True, exist_ok=True)
                if delivery.attempts or delivery.resumed:
                    since = parse_iso(delivery.created_at)
                    if ndjson.written_since(directory, delivery.id, since):
                        self.counters["already_written"] += 1
                        return Result(OK, None, "already in the file from an earlier attempt; not written again")
                now = self.clock()
                path = ndjson.file_for(directory, now)
                torn = ndjson.repair_tail(path)
                if torn:
                    self.counters["torn_records_set_aside"] += 1
                end, new = ndjson.write(path, ndjson.encode_records(delivery.id, now, records))
                if new:
                    self.syncs.created(path)
            # On disk before it counts as delivered; the fsync outside the lock, so the deliveries
            # appended meanwhile share it.
            self.syncs.wait(path, end)
        except OSError as exc:
            return Result(TRANSIENT, None, "", error=f"cannot write {directory}: {exc.strerror}")
        notice = ""
        if torn:
            notice = (f"the last record of {path.name} was torn ({torn} bytes); set aside in "
                      f"{path.name}{ndjson.TORN_SUFFIX} before appending")
        return Result(OK, None, path.name + (f"; {notice}" if notice else ""), notice=notice)

    def close(self):
        return defer.succeed(None)


def sender_for(destination: Destination, reactor, run_blocking):
    """The sender of a destination's type. ``reactor`` gives the HTTP senders their clock and
    connections; ``run_blocking(fn, *args) -> Deferred`` runs file writes off the reactor."""
    if destination.type == "fhir":
        return FhirSender(destination, reactor)
    if destination.type == "erp-http":
        return ErpHttpSender(destination, reactor)
    if destination.type == "erp-tryton":
        return TrytonSender(destination, reactor)
    return FileSender(destination, run_blocking)
