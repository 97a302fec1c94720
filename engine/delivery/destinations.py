"""Destinations: where Bundles go. One YAML file per destination in ``destinations/``.

    name: fhir-main
    type: fhir                  # fhir, file
    url: http://127.0.0.1:8103/fhir/R4
    mode: transaction           # or: resources (one PUT per resource, by its stable ID)
    auth: {bearer: ${FHIR_TOKEN}}
    retry: {max_attempts: 12, max_age: 24h, initial_delay: 2s, max_delay: 10m}
    concurrency: 4

``${NAME}`` in any text value is read from the environment, so secrets stay out of the files.
Every key is documented in docs/destinations.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..yamlconf import Section, expand_env, load_yaml, seconds

TYPES = ("fhir", "file", "erp-http", "erp-tryton")
PAYLOADS = ("bundle", "message", "finance-events")
FHIR_MODES = ("transaction", "resources")
ORDER_KEYS = ("patient", "appointment", "account", "message", "none")
KEYS = {
    "destination": {"name", "description", "type", "url", "mode", "auth", "tls", "timeout", "connect_timeout", "directory",
                    "retry", "concurrency", "cluster_concurrency", "order_by", "payload", "body", "database", "product",
                    "cash_account"},
    "auth": {"bearer", "basic", "oauth2"},
    "basic": {"username", "password"},
    "oauth2": {"token_url", "client_id", "client_secret", "scope"},
    "tls": {"verify", "ca"},
    "retry": {"max_attempts", "max_age", "initial_delay", "max_delay", "multiplier", "jitter"},
}
@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a delivery is dead after ``max_attempts`` or ``max_age``."""

    max_attempts: int = 12
    max_age: float = 24 * 3600.0
    initial_delay: float = 2.0
    max_delay: float = 600.0
    multiplier: float = 2.0
    jitter: float = 0.2  # +/- this fraction of the delay, so a fleet of retries does not stampede

    def delay(self, attempt: int, random_fraction: float) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); random_fraction in [0, 1)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return max(0.0, base * (1 + self.jitter * (2 * random_fraction - 1)))


@dataclass(frozen=True)
class Destination:
    name: str
    type: str
    path: str
    description: str = ""
    url: str = ""
    mode: str = "transaction"
    bearer: str | None = None
    basic: tuple | None = None  # (username, password)
    oauth2: tuple | None = None  # (token_url, client_id, client_secret, scope)
    verify_tls: bool = True
    ca: str | None = None
    timeout: float = 30.0  # for the answer to each request
    connect_timeout: float = 5.0  # for the connection (TCP, and the TLS handshake): a dead server frees its slots fast
    directory: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 4  # in flight at once on each node
    cluster_concurrency: int | None = None  # in flight at once across every node of a cluster (None: no cap)
    order_by: str = "patient"
    payload: str = "bundle"  # what is sent: the FHIR Bundle, a FHIR message, or the canonical finance events
    body: dict | None = None  # erp-http: the shape of each request body (a template over the event)
    database: str = ""  # erp-tryton: the Tryton database
    product: str = "Patient charge"  # erp-tryton: the product invoice lines use
    cash_account: str = ""  # erp-tryton: the code of the account payments are received into


def load_destination(path: Path, base: Path) -> Destination:
    data = load_yaml(path)
    top = Section(data, path, "destination", KEYS["destination"])
    name = top.get("name", str, None)
    if not name:
        raise top.error("name", "is required", "the name routes use in their destinations list")
    kind = top.choice("type", TYPES, None) if top.data.get("type") is not None else None
    if kind is None:
        raise top.error("type", "is required", f"one of {', '.join(TYPES)}")
    retry_section = Section(top.data.get("retry"), path, "retry", KEYS["retry"], top.line("retry"))
    try:
        defaults = RetryPolicy()
        retry = RetryPolicy(
            max_attempts=retry_section.positive("max_attempts", int, defaults.max_attempts),
            max_age=seconds(retry_section.data.get("max_age", "24h"), "retry.max_age"),
            initial_delay=seconds(retry_section.data.get("initial_delay", "2s"), "retry.initial_delay"),
            max_delay=seconds(retry_section.data.get("max_delay", "10m"), "retry.max_delay"),
            multiplier=retry_section.positive("multiplier", float, defaults.multiplier),
            jitter=retry_section.get("jitter", float, defaults.jitter),
        )
        timeout = seconds(top.data.get("timeout", "30s"), "timeout")
        connect_timeout = seconds(top.data.get("connect_timeout", "5s"), "connect_timeout")
    except ValueError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(str(exc), path, top.line(key) if key in top.data else top.line("retry")) from None
    fields = dict(
        name=name, type=kind, path=str(path), description=top.get("description", str, ""), retry=retry,
        timeout=timeout, connect_timeout=connect_timeout, concurrency=top.positive("concurrency", int, 4),
        cluster_concurrency=(top.positive("cluster_concurrency", int, None)
                             if top.data.get("cluster_concurrency") is not None else None),
        order_by=top.choice("order_by", ORDER_KEYS, "patient"),
        payload=top.choice("payload", PAYLOADS, "finance-events" if kind.startswith("erp-") else "bundle"),
    )
    if kind.startswith("erp-") and fields["payload"] != "finance-events":
        raise top.error("payload", "an ERP destination takes finance-events")
    if kind == "fhir" and fields["payload"] == "finance-events":
        raise top.error("payload", "a FHIR destination takes bundle or message")
    if kind in ("fhir", "erp-http", "erp-tryton"):
        url = expand_env(top.get("url", str, None), top, "url")
        if not url or not url.startswith(("http://", "https://")):
            raise top.error("url", "is required: the base URL", "e.g. https://fhir.example.org/fhir/R4")
        auth = Section(top.data.get("auth"), path, "auth", KEYS["auth"], top.line("auth"))
        basic = None
        if auth.data.get("basic") is not None:
            b = Section(auth.data["basic"], path, "auth.basic", KEYS["basic"], auth.line("basic"))
            basic = (expand_env(b.get("username", str, ""), b, "username"), expand_env(b.get("password", str, ""), b, "password"))
        oauth2 = None
        if auth.data.get("oauth2") is not None:
            o = Section(auth.data["oauth2"], path, "auth.oauth2", KEYS["oauth2"], auth.line("oauth2"))
            token_url = expand_env(o.get("token_url", str, None), o, "token_url")
            if not token_url:
                raise o.error("token_url", "is required", "the authorization server's token endpoint")
            oauth2 = (token_url, expand_env(o.get("client_id", str, ""), o, "client_id"),
                      expand_env(o.get("client_secret", str, ""), o, "client_secret"), o.get("scope", str, ""))
        if sum(x is not None for x in (auth.data.get("bearer"), basic, oauth2)) > 1:
            raise top.error("auth", "give one of bearer, basic or oauth2")
        tls = Section(top.data.get("tls"), path, "tls", KEYS["tls"], top.line("tls"))
        ca = tls.get("ca", str, None)
        if kind == "erp-http":
            body = top.get("body", dict, None)
            fields["body"] = dict(body) if body is not None else None
        if kind == "erp-tryton":
            fields["database"] = top.get("database", str, "")
            if not fields["database"]:
                raise top.error("database", "is required for Tryton", "the database name trytond serves")
            fields["product"] = top.get("product", str, "Patient charge")
            fields["cash_account"] = top.get("cash_account", str, "", hint='quote it: cash_account: "1.1.1"')
            fields["concurrency"] = 1  # Tryton wants one writer per database: one at a time,
            fields["cluster_concurrency"] = 1  # however many nodes send to it
            if basic is None:
                raise auth.error("basic", "Tryton needs auth.basic with its user name and password")
        fields.update(
            url=url.rstrip("/"), mode=top.choice("mode", FHIR_MODES, "transaction"),
            bearer=expand_env(auth.get("bearer", str, None), auth, "bearer"), basic=basic, oauth2=oauth2,
            verify_tls=tls.get("verify", bool, True), ca=str(base / ca) if ca else None,
        )
    elif kind == "file":
        directory = top.get("directory", str, None)
        if not directory:
            raise top.error("directory", "is required for a file destination", "e.g. var/outbox/fhir")
        fields.update(directory=base / directory)
    return Destination(**fields)


def load_destinations(directory: Path, base: Path) -> dict[str, Destination]:
    """Every ``directory/*.yaml``, by name; names must be unique."""
    found: dict[str, Destination] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.yaml")):
        destination = load_destination(path, base)
        if destination.name in found:
            raise ConfigError(f"destination name {destination.name!r} is also used in {found[destination.name].path}",
                              path, 1, "give every destination its own name")
        found[destination.name] = destination
    return found
