"""Sending one Bundle to one destination: FHIR REST over Twisted's HTTP client, or a file.

A sender returns a Deferred that fires with an ``outbox.Result``: OK, TRANSIENT (retry later:
timeouts, refused connections, 5xx, 408, 429) or PERMANENT (dead-letter: other 4xx, a Bundle the
server refuses). Senders never raise for a failed delivery and never log message content.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

from twisted.internet import defer, threads
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.internet.ssl import Certificate as TLSCertificate
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    PartialDownloadError,
    RequestTransmissionFailed,
    ResponseFailed,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from .destinations import Destination
from . import ndjson
from .finance import events
from .outbox import OK, PERMANENT, TRANSIENT, Result, parse_iso as outbox_time

FHIR_JSON = b"application/fhir+json"
TOKEN_EARLY_REFRESH = 30.0  # seconds before an OAuth2 token expires that a new one is fetched


class TokenError(Exception):
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


NETWORK_ERRORS = (ConnectError, DNSLookupError, TxTimeoutError, ResponseFailed, RequestTransmissionFailed,
                  ConnectionLost, defer.TimeoutError)


def network_error(exc: Exception, destination: Destination) -> str:
    """A failed request in words for the journal and the log (never a Python class name)."""
    if isinstance(exc, DNSLookupError):
        return "the server's host name could not be resolved"
    if isinstance(exc, TxTimeoutError):
        return f"no connection within connect_timeout ({destination.connect_timeout:g}s)"
    if isinstance(exc, defer.TimeoutError):
        return f"no answer within timeout ({destination.timeout:g}s)"
    if isinstance(exc, ConnectError):
        code = getattr(exc, "osError", None)
        reason = os.strerror(code) if isinstance(code, int) else (exc.__doc__ or "refused")
        return f"cannot connect: {str(reason).strip().rstrip('.').lower()}"
    tls = destination.url.startswith("https:")
    if any("ssl" in type(r.value).__module__.lower() for r in getattr(exc, "reasons", []) or []):
        return "the TLS handshake with the server failed"
    if isinstance(exc, RequestTransmissionFailed):
        return "the connection was lost before the request was sent" + (
            " (the TLS handshake failed, or did not finish within connect_timeout)" if tls else "")
    if isinstance(exc, ResponseFailed):
        return "the connection closed before the server answered"
    return "the connection was lost"


def classify_status(status: int) -> str:
    """HTTP status to an outbox outcome: 2xx OK; 408, 429 and 5xx transient; other 4xx permanent."""
    if 200 <= status < 300:
        return OK
    if status in (408, 429) or status >= 500:
        return TRANSIENT
    return PERMANENT


def retry_after(value: bytes | None) -> float | None:
    """Seconds from a Retry-After header (only the delta-seconds form)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.decode().strip()))
    except ValueError:
        return None


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


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """tls.verify: false (a test server with a self-signed certificate). Never the default."""

    def creatorForNetloc(self, hostname, port):
        from twisted.internet.ssl import CertificateOptions

        return CertificateOptions(verify=False)


@implementer(IPolicyForHTTPS)
class _CustomCA:
    def __init__(self, ca_path: str):
        self.trust = TLSCertificate.loadPEM(Path(ca_path).read_bytes())

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(hostname.decode(), trustRoot=self.trust)


class _HandshakeWithin:
    """A TLS client endpoint whose connection counts as made only once the handshake is done:
    a server that accepts TCP connections but never finishes TLS is given up on after the
    connect timeout, not after the (longer) request timeout."""

    def __init__(self, endpoint, reactor, timeout: float):
        self.endpoint, self.reactor, self.timeout = endpoint, reactor, timeout

    def connect(self, factory):
        started = self.reactor.seconds()

        def connected(protocol):
            transport = protocol.transport
            # TLSMemoryBIOProtocol keeps whether its handshake finished; give it what is left.
            if getattr(transport, "_handshakeDone", True) is False:
                remaining = max(0.0, self.timeout - (self.reactor.seconds() - started))
                self.reactor.callLater(remaining, self._give_up_unless_done, transport)
            return protocol

        return self.endpoint.connect(factory).addCallback(connected)

    @staticmethod
    def _give_up_unless_done(transport):
        if getattr(transport, "_handshakeDone", True) is False and not getattr(transport, "disconnected", False):
            transport.abortConnection()


@implementer(IAgentEndpointFactory)
class ConnectWithin:
    """Endpoints for the HTTP agent with ``connect_timeout`` on the TCP connect and the TLS handshake."""

    def __init__(self, reactor, policy, timeout: float):
        self.reactor, self.policy, self.timeout = reactor, policy, timeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        endpoint = HostnameEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            creator = self.policy.creatorForNetloc(uri.host, uri.port)
            return _HandshakeWithin(wrapClientTLS(creator, endpoint), self.reactor, self.timeout)
        return endpoint


class FhirSender:
    """Delivers Bundles to a FHIR server: one transaction, or one PUT per resource."""

    def __init__(self, destination: Destination, reactor):
        self.destination = destination
        self.reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = destination.concurrency
        if not destination.verify_tls:
            policy = _NoVerification()
        elif destination.ca:
            policy = _CustomCA(destination.ca)
        else:
            policy = BrowserLikePolicyForHTTPS(platformTrust())
        self.agent = Agent.usingEndpointFactory(reactor, ConnectWithin(reactor, policy, destination.connect_timeout), pool)
        self.pool = pool
        self._token = None  # OAuth2: (access token, expiry as reactor seconds)
        self._token_request = None

    def headers(self) -> Headers:
        headers = Headers({b"Content-Type": [FHIR_JSON], b"Accept": [FHIR_JSON], b"User-Agent": [b"hl7bridge"]})
        if self.destination.oauth2 and self._token:
            headers.addRawHeader(b"Authorization", b"Bearer " + self._token[0].encode())
        elif self.destination.bearer:
            headers.addRawHeader(b"Authorization", b"Bearer " + self.destination.bearer.encode())
        elif self.destination.basic:
            user, password = self.destination.basic
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers.addRawHeader(b"Authorization", f"Basic {token}".encode())
        return headers

    @defer.inlineCallbacks
    def token(self):
        """OAuth2 client credentials: a cached access token, fetched again shortly before it expires.

        Concurrent deliveries share one token request.
        """
        now = self.reactor.seconds()
        if self._token and now < self._token[1]:
            return self._token[0]
        if self._token_request is None:
            self._token_request = self._fetch_token()
            self._token_request.addBoth(self._token_fetched)
        waiter = defer.Deferred()
        self._token_request.addBoth(lambda result: waiter.callback(result) or result)
        token = yield waiter
        if isinstance(token, Exception):
            raise token
        return token

    def _token_fetched(self, result):
        self._token_request = None
        return result

    @defer.inlineCallbacks
    def _fetch_token(self):
        from urllib.parse import urlencode

        token_url, client_id, client_secret, scope = self.destination.oauth2
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
        if scope:
            form["scope"] = scope
        headers = Headers({b"Content-Type": [b"application/x-www-form-urlencoded"], b"Accept": [b"application/json"]})
        try:
            d = self.agent.request(b"POST", token_url.encode(), headers, FileBodyProducer(BytesIO(urlencode(form).encode())))
            d.addTimeout(self.destination.timeout, self.reactor)
            response = yield d
            body = yield readBody(response)
        except Exception as exc:  # reported as a transient failure of the delivery that needed it
            return TokenError(f"token request failed: {network_error(exc, self.destination)}")
        if response.code != 200:
            return TokenError(f"token endpoint answered HTTP {response.code}", response.code)
        try:
            answer = json.loads(body)
            token = answer["access_token"]
        except (ValueError, KeyError):
            return TokenError("token endpoint gave no access_token")
        lifetime = float(answer.get("expires_in", 300))
        self._token = (token, self.reactor.seconds() + max(1.0, lifetime - TOKEN_EARLY_REFRESH))
        return token

    @defer.inlineCallbacks
    def request(self, method: bytes, url: str, body: bytes, extra: dict | None = None):
        """(status, body, Retry-After) of one request, with the destination's timeout."""
        if self.destination.oauth2:
            yield self.token()
        headers = self.headers()
        for name, value in (extra or {}).items():
            headers.setRawHeaders(name, [value])
        d = self.agent.request(method, url.encode(), headers, FileBodyProducer(BytesIO(body)))
        d.addTimeout(self.destination.timeout, self.reactor)
        response = yield d
        if response.code == 401 and self.destination.oauth2:
            self._token = None  # revoked or expired early: the next attempt fetches a new one
        body = readBody(response)
        # A server that sends no Content-Length ends its body by closing the connection, which
        # readBody reports as a partial download; the body is complete all the same.
        body.addErrback(lambda failure: failure.trap(PartialDownloadError) and failure.value.response)
        content = yield body.addTimeout(self.destination.timeout, self.reactor)
        return response.code, content, response.headers.getRawHeaders(b"retry-after", [None])[0]

    @defer.inlineCallbacks
    def send(self, delivery):
        try:
            if self.destination.mode == "transaction":
                result = yield self._transaction(delivery.bundle)
            else:
                result = yield self._resources(delivery.bundle)
        except NETWORK_ERRORS as exc:
            result = Result(TRANSIENT, None, str(exc)[:300], error=network_error(exc, self.destination))
        except TokenError as exc:
            # A refused client (400/401 from the token endpoint) will not get better by itself.
            outcome = PERMANENT if exc.status in (400, 401, 403) else TRANSIENT
            result = Result(outcome, exc.status, "", error=str(exc))
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
    def _resources(self, bundle_json: str):
        status = None
        for url, resource in resources_in_order(json.loads(bundle_json)):
            status, body, after = yield self.request(b"PUT", f"{self.destination.url}/{url}", json.dumps(resource).encode())
            outcome = self.classify(status)
            if outcome != OK:
                text = body.decode("utf-8", errors="replace")
                return Result(outcome, status, text, retry_after(after), error=f"HTTP {status} on PUT {url.split('/')[0]}")
        return Result(OK, status, "")

    def close(self):
        return self.pool.closeCachedConnections()


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


class ErpHttpSender(FhirSender):
    """POSTs each finance event (shaped by the destination's body template) as JSON.

    Each request carries ``Idempotency-Key: <event_id>``: if a delivery is retried after some of
    its events went through, the ERP can recognise the ones it already has.
    """

    def headers(self) -> Headers:
        headers = super().headers()
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
        headers.setRawHeaders(b"Accept", [b"application/json"])
        return headers

    @defer.inlineCallbacks
    def send(self, delivery):
        status = None
        try:
            for event in events(json.loads(delivery.bundle), delivery.message_id, delivery.control_id,
                                delivery.discriminator):
                body = shape(self.destination.body, event) if self.destination.body else event
                status, content, after = yield self.request(
                    b"POST", self.destination.url, json.dumps(body).encode(),
                    {b"Idempotency-Key": event["event_id"].encode()},
                )
                outcome = classify_status(status)
                if outcome != OK:
                    return Result(outcome, status, content.decode("utf-8", errors="replace"), retry_after(after),
                                  error=f"HTTP {status} on {event['event']}")
        except NETWORK_ERRORS as exc:
            return Result(TRANSIENT, None, str(exc)[:300], error=network_error(exc, self.destination))
        return Result(OK, status, "")


class FileSender:
    """Appends each Bundle (or each finance event) as one line of NDJSON to
    DIRECTORY/YYYY-MM-DD.ndjson, fsynced before the delivery counts as delivered.

    Every record carries its delivery ID. A torn record left by a crash is cut off and kept aside
    before anything is appended (``engine.delivery.ndjson``), and a delivery that is tried again (after a
    failure, or resumed after a crash) first looks whether its records already reached the file:
    each delivery is in the file once, whole. Appends are serialized (one lock per destination),
    so records never interleave.
    """

    def __init__(self, destination: Destination, reactor, clock=None):
        self.destination = destination
        self.reactor = reactor
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.lock = threading.Lock()
        # For /metrics: torn records set aside, and resumed deliveries found already written.
        self.counters = {"torn_records_set_aside": 0, "already_written": 0}

    def start(self) -> list[tuple[str, int]]:
        """Repair every day file of the directory (at start-up); returns [(file, bytes set aside)]."""
        with self.lock:
            repaired = ndjson.repair_directory(self.destination.directory)
        self.counters["torn_records_set_aside"] += len(repaired)
        return repaired

    def send(self, delivery):
        pool = self.reactor.getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, self.write, delivery)

    def write(self, delivery) -> Result:
        """Write one delivery's records (blocking: run in a thread)."""
        directory = self.destination.directory
        try:
            bundle = json.loads(delivery.bundle)
            if self.destination.payload == "finance-events":
                records = events(bundle, delivery.message_id, delivery.control_id, delivery.discriminator)
            else:
                records = [{"message_id": delivery.message_id, "control_id": delivery.control_id, "bundle": bundle}]
            with self.lock:
                directory.mkdir(parents=True, exist_ok=True)
                if delivery.attempts or delivery.resumed:
                    since = outbox_time(delivery.created_at)
                    if ndjson.written_since(directory, delivery.id, since):
                        self.counters["already_written"] += 1
                        return Result(OK, None, "already in the file from an earlier attempt; not written again")
                now = self.clock()
                path = ndjson.file_for(directory, now)
                torn = ndjson.repair_tail(path)
                if torn:
                    self.counters["torn_records_set_aside"] += 1
                ndjson.append(path, ndjson.encode_records(delivery.id, now, records))
        except OSError as exc:
            return Result(TRANSIENT, None, "", error=f"cannot write {directory}: {exc.strerror}")
        notice = ""
        if torn:
            notice = (f"the last record of {path.name} was torn ({torn} bytes); set aside in "
                      f"{path.name}{ndjson.TORN_SUFFIX} before appending")
        return Result(OK, None, path.name + (f"; {notice}" if notice else ""), notice=notice)

    def close(self):
        return defer.succeed(None)


def sender_for(destination: Destination, reactor):
    if destination.type == "fhir":
        return FhirSender(destination, reactor)
    if destination.type == "erp-http":
        return ErpHttpSender(destination, reactor)
    if destination.type == "erp-tryton":
        from .tryton import TrytonSender

        return TrytonSender(destination, reactor)
    return FileSender(destination, reactor)
