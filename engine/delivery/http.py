"""One HTTP client for every sender (FHIR, ERP over REST, Tryton): Twisted's Agent, configured once.

What it owns, per destination: the TLS policy (the platform's trust, a custom CA, or no
verification for a test server), ``connect_timeout`` on the TCP connect *and* the TLS handshake
(a server that accepts connections but never finishes TLS frees its slot as fast as a dead one),
``timeout`` on each answer, persistent connections (one pool, ``concurrency`` per host), and
authentication: a bearer token, basic, or OAuth2 client credentials with the access token cached
and fetched again shortly before it expires (concurrent deliveries share one token request).

What it decides: which failures are worth another try (``NETWORK_ERRORS``, ``transient_status``)
and how a failure reads in the journal and the log (``network_error``: words, never a Python class
name). Senders compose a client (``HttpClient(destination, reactor)``); tests hand it a fake
``IAgent``.
"""

from __future__ import annotations

import base64
import json
import os
from io import BytesIO
from pathlib import Path
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.ssl import Certificate as TLSCertificate
from twisted.internet.ssl import optionsForClientTLS, platformTrust
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
from .outbox import OK, PERMANENT, TRANSIENT, Result

TOKEN_EARLY_REFRESH = 30.0  # seconds before an OAuth2 token expires that a new one is fetched


class TokenError(Exception):
    """The OAuth2 token endpoint refused (``status``) or could not be reached."""

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


def transient_status(status: int) -> bool:
    """408, 429 and 5xx: the server may well answer differently later."""
    return status in (408, 429) or status >= 500


def classify_status(status: int) -> str:
    """HTTP status to an outbox outcome: 2xx OK; 408, 429 and 5xx transient; other 4xx permanent."""
    if 200 <= status < 300:
        return OK
    if transient_status(status):
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


def failure_result(exc: Exception, destination: Destination) -> Result:
    """The attempt's result when a request failed before an answer: a network error or the OAuth2
    token (a refused client, 400/401/403 from the token endpoint, will not get better by itself)."""
    if isinstance(exc, TokenError):
        outcome = PERMANENT if exc.status in (400, 401, 403) else TRANSIENT
        return Result(outcome, exc.status, "", error=str(exc))
    return Result(TRANSIENT, None, str(exc)[:300], error=network_error(exc, destination))


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


class HttpClient:
    """Requests to one destination: TLS, timeouts, persistent connections and authentication."""

    def __init__(self, destination: Destination, reactor, agent=None):
        self.destination = destination
        self.reactor = reactor
        self.pool = None
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = destination.concurrency
            if not destination.verify_tls:
                policy = _NoVerification()
            elif destination.ca:
                policy = _CustomCA(destination.ca)
            else:
                policy = BrowserLikePolicyForHTTPS(platformTrust())
            agent = Agent.usingEndpointFactory(reactor, ConnectWithin(reactor, policy, destination.connect_timeout), pool)
            self.pool = pool
        self.agent = agent
        self._token = None  # OAuth2: (access token, expiry as reactor seconds)
        self._token_request = None

    def authorization(self) -> bytes | None:
        """The Authorization header the destination's auth gives (OAuth2: the cached token)."""
        destination = self.destination
        if destination.oauth2 and self._token:
            return b"Bearer " + self._token[0].encode()
        if destination.bearer:
            return b"Bearer " + destination.bearer.encode()
        if destination.basic:
            user, password = destination.basic
            return f"Basic {base64.b64encode(f'{user}:{password}'.encode()).decode()}".encode()
        return None

    @defer.inlineCallbacks
    def token(self):
        """OAuth2 client credentials: a cached access token, fetched again shortly before it expires.

        Concurrent deliveries share one token request.
        """
        now = self.reactor.seconds()
        if self._token and now < self._token[1]:
            return self._token[0]
        request = self._token_request
        if request is None:
            # (A request that fails at once fires before addBoth returns: keep it by name.)
            request = self._token_request = self._fetch_token()
            request.addBoth(self._token_fetched)
        waiter = defer.Deferred()
        request.addBoth(lambda result: waiter.callback(result) or result)
        token = yield waiter
        if isinstance(token, Exception):
            raise token
        return token

    def _token_fetched(self, result):
        self._token_request = None
        return result

    @defer.inlineCallbacks
    def _fetch_token(self):
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
    def request(self, method: bytes, url: str, body: bytes, headers: dict[bytes, bytes], authorize: bool = True):
        """(status, body, Retry-After) of one request, with the destination's timeout.

        ``headers`` are the sender's own; with ``authorize`` the destination's Authorization is
        added (an OAuth2 token is fetched first when there is none or it is about to expire).
        Raises one of ``NETWORK_ERRORS`` or ``TokenError`` when no answer came.
        """
        if authorize and self.destination.oauth2:
            yield self.token()
        sent = Headers()
        for name, value in headers.items():
            sent.setRawHeaders(name, [value])
        if authorize:
            authorization = self.authorization()
            if authorization is not None:
                sent.setRawHeaders(b"Authorization", [authorization])
        d = self.agent.request(method, url.encode(), sent, FileBodyProducer(BytesIO(body)))
        d.addTimeout(self.destination.timeout, self.reactor)
        response = yield d
        if response.code == 401 and authorize and self.destination.oauth2:
            self._token = None  # revoked or expired early: the next attempt fetches a new one
        content = readBody(response)
        # A server that sends no Content-Length ends its body by closing the connection, which
        # readBody reports as a partial download; the body is complete all the same.
        content.addErrback(lambda failure: failure.trap(PartialDownloadError) and failure.value.response)
        content = yield content.addTimeout(self.destination.timeout, self.reactor)
        return response.code, content, response.headers.getRawHeaders(b"retry-after", [None])[0]

    def close(self):
        if self.pool is None:
            return defer.succeed(None)
        return self.pool.closeCachedConnections()
