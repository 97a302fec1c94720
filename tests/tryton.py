"""A real Tryton ERP for the tests: a prepared SQLite template and a ``trytond`` JSON-RPC server.

Stdlib only at import time (pytest is optional, for the fixtures at the bottom).  Tryton itself
only ever runs as subprocesses, from the environment of ``sys.executable``:

* :func:`prepare_template` builds, once per cache key (Tryton versions, setup code, year), a
  SQLite database ready for customer invoices: ``trytond-admin`` activates account_invoice, then a
  temporary server receives the accounting setup over JSON-RPC (:func:`_setup_database`).
* :class:`TrytonServer` copies that file into a private directory and runs
  ``trytond -c CONF -d DBNAME`` on 127.0.0.1 with a port chosen by the kernel.
* ``tryton_template`` (session) and ``tryton_server`` (function) are pytest fixtures; import them
  into a conftest.py.  They skip when Tryton is not installed.

Needs ``trytond==8.2.*`` and ``trytond-account-invoice==8.2.*``.  The JSON-RPC calls an adapter
makes are in tests/e2e/erp/README.md.  ``python tests/tryton.py --serve`` runs one by hand.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import decimal
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

ADMIN_USER = "admin"
ADMIN_PASSWORD = "hl7bridge-admin"
ADMIN_EMAIL = "admin@hl7bridge.invalid"
COMPANY_NAME = "hl7bridge test clinic"
CURRENCY_CODE = "USD"
CATEGORY_NAME = "Patient services"
PRODUCT_NAME = "Patient charge"
PRODUCT_CODE = "PATIENT-CHARGE"
PAYMENT_TERM_NAME = "Upon Receipt"  # shipped by account_invoice: one "remainder" line
# The universal chart (xml id account.account_template_root_en); its accounts picked by code.
CHART_NAME = "Universal Chart of Accounts"
ACCOUNT_CODES = {"receivable": "1.2.1", "payable": "2.1.1", "revenue": "4.1.2", "expense": "5.1.3"}
MODULES = ("account_invoice",)
DISTRIBUTIONS = ("trytond", "trytond-account-invoice")
# Bump when the template's content changes in a way the source hash below would not catch.
TEMPLATE_FORMAT = 1

BIN = Path(sys.executable).parent
RUNNING_ON = re.compile(rb"Running on https?://[^:/\s]+:(\d+)")


TRYTON_EXCEPTIONS = {"UserError", "UserWarning", "LoginException", "ConcurrencyException",
                     "RateLimitException", "TimeOutException", "MissingDependenciesException"}


class TrytonError(Exception):
    """An error answered by Tryton (``{"error": [...]}``) or an HTTP error from the server.

    ``kind`` is Tryton's exception name (``UserError``, which includes access and validation
    errors, ``UserWarning``, ``ConcurrencyException``, ...), ``ServerError`` for any other
    exception in the server (payload [message, traceback]), or ``HTTP <status>`` (401: session
    expired or not fresh enough; 403: method not callable over RPC).  ``payload`` is the rest.
    """

    def __init__(self, kind: str, payload, method: str | None = None):
        self.kind = kind
        self.payload = payload
        self.method = method
        super().__init__(f"{method}: {kind}: {payload!r}" if method else f"{kind}: {payload!r}")

    @property
    def message(self) -> str:
        """The human-readable message: UserError [message, description, domain], UserWarning
        [key, message, description]; otherwise the payload as text."""
        if isinstance(self.payload, list) and self.payload:
            if self.kind == "UserWarning" and len(self.payload) > 1:
                return str(self.payload[1])
            if self.kind in ("UserError", "ServerError"):
                return str(self.payload[0])
        return str(self.payload)

    @property
    def warning_key(self) -> str | None:
        """For a UserWarning, the key to acknowledge (``model.res.user.warning.create``)."""
        if self.kind == "UserWarning" and isinstance(self.payload, list) and self.payload:
            return self.payload[0]
        return None


# -- availability and versions ------------------------------------------------------------------

def tool(name: str) -> Path | None:
    """A console script (``trytond``, ``trytond-admin``) of this interpreter's environment."""
    candidate = BIN / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def versions() -> dict[str, str]:
    """Installed versions of the Tryton distributions (missing ones are left out)."""
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def missing_reason() -> str | None:
    """Why Tryton cannot run here, or None when it can."""
    missing = [d for d in DISTRIBUTIONS if d not in versions()]
    if missing:
        return (f"Tryton is not installed ({', '.join(missing)} missing); "
                "pip install 'trytond==8.2.*' 'trytond-account-invoice==8.2.*'")
    for name in ("trytond", "trytond-admin"):
        if tool(name) is None:
            return f"the {name} script is not found beside {sys.executable} nor on PATH"
    return None


def default_cache_dir() -> Path:
    """``$HL7BRIDGE_TRYTON_CACHE`` or a per-user directory under the system temp dir."""
    env = os.environ.get("HL7BRIDGE_TRYTON_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"hl7bridge-tryton-{os.getuid()}"


# -- JSON codec (Tryton's JSON-RPC extensions) --------------------------------------------------

class _Encoder(json.JSONEncoder):
    def default(self, o):
        if isinstance(o, decimal.Decimal):
            return {"__class__": "Decimal", "decimal": str(o)}
        if isinstance(o, dt.datetime):
            return {"__class__": "datetime", "year": o.year, "month": o.month, "day": o.day,
                    "hour": o.hour, "minute": o.minute, "second": o.second,
                    "microsecond": o.microsecond}
        if isinstance(o, dt.date):
            return {"__class__": "date", "year": o.year, "month": o.month, "day": o.day}
        if isinstance(o, dt.time):
            return {"__class__": "time", "hour": o.hour, "minute": o.minute, "second": o.second,
                    "microsecond": o.microsecond}
        if isinstance(o, dt.timedelta):
            return {"__class__": "timedelta", "seconds": o.total_seconds()}
        if isinstance(o, (bytes, bytearray)):
            return {"__class__": "bytes", "base64": base64.b64encode(o).decode()}
        return super().default(o)


def _object_hook(obj: dict):
    kind = obj.get("__class__")
    if kind is None:
        return obj
    if kind == "Decimal":
        return decimal.Decimal(obj["decimal"])
    if kind == "date":
        return dt.date(obj["year"], obj["month"], obj["day"])
    if kind == "datetime":
        return dt.datetime(obj["year"], obj["month"], obj["day"], obj.get("hour", 0),
                           obj.get("minute", 0), obj.get("second", 0), obj.get("microsecond", 0))
    if kind == "time":
        return dt.time(obj.get("hour", 0), obj.get("minute", 0), obj.get("second", 0),
                       obj.get("microsecond", 0))
    if kind == "timedelta":
        return dt.timedelta(seconds=obj["seconds"])
    if kind == "bytes":
        return base64.b64decode(obj["base64"])
    return obj


def dumps(value) -> bytes:
    return json.dumps(value, cls=_Encoder, separators=(",", ":")).encode()


def loads(data: bytes):
    return json.loads(data, object_hook=_object_hook)


# -- template database --------------------------------------------------------------------------

def _write_config(path: Path, db_dir: Path, listen: str = "127.0.0.1:0", extra: str = "") -> Path:
    path.write_text(
        "[database]\n"
        "uri = sqlite://\n"
        f"path = {db_dir}\n"
        "\n[web]\n"
        f"listen = {listen}\n"
        + extra
    )
    return path


def template_key(year: int | None = None) -> str:
    """Cache key of the template: Tryton versions, the setup code, and the current year."""
    year = year or dt.date.today().year
    parts = {
        "format": TEMPLATE_FORMAT,
        "versions": versions(),
        "python": sys.version_info[:2],
        "year": year,
        "setup": inspect.getsource(_setup_database),
        "constants": [ADMIN_USER, ADMIN_PASSWORD, COMPANY_NAME, CURRENCY_CODE, CATEGORY_NAME,
                      PRODUCT_NAME, PRODUCT_CODE, PAYMENT_TERM_NAME, CHART_NAME, ACCOUNT_CODES,
                      MODULES],
    }
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _run(args, env, log: Path, timeout: float) -> None:
    with open(log, "ab") as out:
        proc = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{tail}")


def build_template(target: Path | str, year: int | None = None,
                   timings: dict | None = None) -> Path:
    """Build a ready-to-invoice SQLite database at ``target`` (no caching; see prepare_template).

    ``trytond-admin`` creates the database and activates account_invoice (13-20 s, CPU-bound);
    then a temporary server gets the accounting setup over JSON-RPC (about 2 s).
    """
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    year = year or dt.date.today().year
    timings = {} if timings is None else timings
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="tryton-build-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        dbname = "template"
        conf = _write_config(tmp / "trytond.conf", tmp)
        passfile = tmp / "password"
        passfile.write_text(ADMIN_PASSWORD + "\n")
        (tmp / f"{dbname}.sqlite").touch()  # the SQLite backend only opens existing files
        env = {**os.environ, "TRYTONPASSFILE": str(passfile), "PYTHONUNBUFFERED": "1"}
        for key in ("TRYTOND_DATABASE_URI", "TRYTOND_CONFIG"):
            env.pop(key, None)
        start = time.monotonic()
        _run([str(tool("trytond-admin")), "-c", str(conf), "-d", dbname, "--email", ADMIN_EMAIL,
              "-u", *MODULES, "--activate-dependencies"], env, tmp / "admin.log", timeout=900)
        timings["trytond-admin"] = time.monotonic() - start
        start = time.monotonic()
        server = TrytonServer(tmp / f"{dbname}.sqlite", workdir=tmp)
        try:
            _setup_database(server, year)
        except BaseException:
            server.stop()
            raise
        server.stop(cleanup=False)
        timings["setup"] = time.monotonic() - start
        _export_sqlite(server.db_path, tmp / "done.sqlite")
        os.replace(tmp / "done.sqlite", target)  # atomic: readers never see a partial file
    return target


def _export_sqlite(source: Path, target: Path) -> None:
    """Copy a database trytond used into one self-contained file, and check its content.

    trytond opens SQLite in WAL mode and a terminated server does not checkpoint, so the main
    file alone misses the latest commits: copy through SQLite's backup API (which reads the WAL)
    and store the copy in rollback-journal mode, so that a plain file copy of it is complete.
    """
    import sqlite3

    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode = DELETE")
        products = dst.execute("SELECT COUNT(*) FROM product_product WHERE code = ?",
                               (PRODUCT_CODE,)).fetchone()[0]
        years = dst.execute("SELECT COUNT(*) FROM account_fiscalyear").fetchone()[0]
    finally:
        dst.close()
        src.close()
    if products != 1 or years != 2:
        raise RuntimeError(f"template {target} is incomplete: {products} product(s) "
                           f"{PRODUCT_CODE}, {years} fiscal year(s)")


def prepare_template(cache_dir: Path | str | None = None, year: int | None = None) -> Path:
    """The cached template database for this Tryton version, setup code and year (built once).

    ``cache_dir`` defaults to :func:`default_cache_dir`.  Safe against concurrent callers
    (pytest-xdist workers, parallel checkouts): the build holds a lock file and the result is
    renamed into place atomically.  Each use touches the file; templates unused for a week go.
    """
    import fcntl

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"tryton-{template_key(year)}.sqlite"
    if not path.exists():
        with open(cache_dir / ".tryton-template.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                build_template(path, year)
                week_ago = time.time() - 7 * 86400
                for stale in cache_dir.glob("tryton-*.sqlite"):
                    with contextlib.suppress(FileNotFoundError):
                        if stale != path and stale.stat().st_mtime < week_ago:
                            stale.unlink()
    with contextlib.suppress(OSError):
        os.utime(path)
    return path


def _setup_database(server: TrytonServer, year: int) -> None:
    """Accounting setup of a freshly activated database, over JSON-RPC.

    Currency USD, the company, the universal chart of accounts, two fiscal years (``year`` and
    ``year + 1``) with monthly periods and strict invoice sequences, the shipped "Upon Receipt"
    payment term as default customer payment term, and the service product "Patient charge"
    whose category carries the revenue account.  (Same result as Tryton's proteus test tools;
    JSON-RPC measured a little faster here and needs no proteus.)
    """
    call, rpc = server.call, server.rpc

    usd, = call("currency.currency", "create", [{
        "name": "U.S. Dollar", "symbol": "$", "code": CURRENCY_CODE,
        "rounding": decimal.Decimal("0.01"),
        "rates": [["create", [{"date": dt.date(1, 1, 1), "rate": decimal.Decimal(1)}]]]}])
    clinic, = call("party.party", "create", [{"name": COMPANY_NAME,
                                              "addresses": [["create", [{}]]]}])

    def wizard(name: str, steps: list[tuple[dict, str]]) -> None:
        session, _, _ = rpc(f"wizard.{name}.create", [server.context])
        try:
            for data, state in steps:
                rpc(f"wizard.{name}.execute", [session, data, state, server.context])
        finally:
            rpc(f"wizard.{name}.delete", [session, server.context])

    wizard("company.company.config", [
        ({}, "company"),
        ({"company": {"party": clinic, "currency": usd}}, "add"),
    ])
    server.refresh_context()  # now carries the company
    ctx = server.context
    company = ctx["company"]

    chart, = call("account.account.template", "search",
                  [("parent", "=", None), ("name", "=", CHART_NAME)], 0, 1, None)
    session, _, _ = rpc("wizard.account.create_chart.create", [ctx])
    rpc("wizard.account.create_chart.execute", [session, {}, "account", ctx])
    rpc("wizard.account.create_chart.execute", [
        session, {"account": {"account_template": chart, "company": company}},
        "create_account", ctx])
    accounts = {}
    for kind, code in ACCOUNT_CODES.items():
        accounts[kind], = call("account.account", "search",
                               [("code", "=", code), ("company", "=", company)], 0, 1, None)
    rpc("wizard.account.create_chart.execute", [
        session, {"properties": {
            "company": company,
            "account_receivable": accounts["receivable"],
            "account_payable": accounts["payable"],
            "category_account_revenue": accounts["revenue"],
            "category_account_expense": accounts["expense"]}},
        "create_properties", ctx])
    rpc("wizard.account.create_chart.delete", [session, ctx])

    move_type, = call("ir.sequence.type", "search", [("name", "=", "Account Move")], 0, 1, None)
    invoice_type, = call("ir.sequence.type", "search", [("name", "=", "Invoice")], 0, 1, None)
    for fy_year in (year, year + 1):
        move_seq, invoice_seq = call("ir.sequence.strict", "create", [
            {"name": f"Moves {fy_year}", "sequence_type": move_type, "company": company},
            {"name": f"Invoices {fy_year}", "sequence_type": invoice_type, "company": company,
             "prefix": f"INV/{fy_year}/", "padding": 5}])
        fiscalyear, = call("account.fiscalyear", "create", [{
            "name": str(fy_year), "company": company,
            "start_date": dt.date(fy_year, 1, 1), "end_date": dt.date(fy_year, 12, 31),
            "move_sequence": move_seq,
            "invoice_sequences": [["create", [{
                "company": company,
                "out_invoice_sequence": invoice_seq, "out_credit_note_sequence": invoice_seq,
                "in_invoice_sequence": invoice_seq, "in_credit_note_sequence": invoice_seq}]]]}])
        call("account.fiscalyear", "create_period", [fiscalyear])  # monthly

    term, = call("account.invoice.payment_term", "search",
                 [("name", "=", PAYMENT_TERM_NAME)], 0, 1, None)
    call("account.configuration", "write", [1], {"default_customer_payment_term": term})

    category, = call("product.category", "create", [{
        "name": CATEGORY_NAME, "accounting": True,
        "account_revenue": accounts["revenue"], "account_expense": accounts["expense"]}])
    unit, = call("product.uom", "search", [("name", "=", "Unit")], 0, 1, None)
    call("product.template", "create", [{
        "name": PRODUCT_NAME, "code": PRODUCT_CODE, "type": "service", "default_uom": unit,
        "list_price": decimal.Decimal(0), "account_category": category,
        "products": [["create", [{}]]]}])


# -- the server ---------------------------------------------------------------------------------

class TrytonServer:
    """``trytond`` serving a private copy of the template database on 127.0.0.1.

    ``rpc(method, params)`` sends one raw JSON-RPC call (logging in once); ``call(model, method,
    *args)`` is the same for ``model.<model>.<method>`` with the user's context appended.
    """

    def __init__(self, template: Path | str | None = None, workdir: Path | str | None = None,
                 database: str = "hl7bridge", start: bool = True, start_timeout: float = 60,
                 extra_config: str = "", die_with_parent: bool = True):
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        self.template = Path(template) if template else prepare_template()
        self.database = database
        self.user = ADMIN_USER
        self.password = ADMIN_PASSWORD
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self._tmp = tempfile.mkdtemp(prefix="tryton-", dir=workdir)
        self.dir = Path(self._tmp)
        self.db_path = self.dir / f"{database}.sqlite"
        shutil.copyfile(self.template, self.db_path)
        self.config_path = self.dir / "trytond.conf"
        self.extra_config = extra_config
        self.log_path = self.dir / "trytond.log"
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._session: str | None = None
        self._context: dict | None = None
        self._ids = 0
        if start:
            self.start()

    # lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The database's JSON-RPC endpoint (``POST`` only)."""
        return f"{self.base_url}/{self.database}/rpc/"

    def start(self) -> None:
        """Start trytond; after a stop(cleanup=False), again on the same port and database."""
        if self.process and self.process.poll() is None:
            return
        _write_config(self.config_path, self.dir, listen=f"127.0.0.1:{self.port or 0}",
                      extra=self.extra_config)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key in ("TRYTOND_DATABASE_URI", "TRYTOND_CONFIG", "TRYTONPASSFILE"):
            env.pop(key, None)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.process = subprocess.Popen(
                [str(tool("trytond")), "-c", str(self.config_path), "-d", self.database],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.dir,
                preexec_fn=_parent_death_signal() if self.die_with_parent else None,  # noqa: PLW1509
            )
        _LIVE.add(self)
        self._session = None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"trytond exited {self.process.returncode}:\n{self.log()[-4000:]}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                match = RUNNING_ON.search(f.read())
            if match:
                self.port = int(match.group(1))
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"trytond did not listen within {self.start_timeout} s:\n{self.log()}")
        while time.monotonic() < deadline:  # the pool is loaded before listening; be sure anyway
            try:
                self._post("/rpc/", "common.server.version", [])
                return
            except (OSError, TrytonError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"trytond did not answer JSON-RPC within {self.start_timeout} s")

    def restart(self) -> None:
        """Stop and start again on the same port and database (an ERP outage, for instance)."""
        self.stop(cleanup=False)
        self.start()

    def stop(self, cleanup: bool = True) -> None:
        """Terminate trytond; ``cleanup`` also removes the directory with the database copy."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        _LIVE.discard(self)
        self._session = None
        if cleanup:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> TrytonServer:  # noqa: PYI034 (Self needs 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # JSON-RPC

    def _post(self, path: str, method: str, params, session: str | None = None):
        self._ids += 1
        request = urllib.request.Request(
            self.base_url + path, data=dumps({"id": self._ids, "method": method, "params": params}),
            headers={"Content-Type": "application/json"}, method="POST")
        if session:
            request.add_header("Authorization", "Session " + session)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                body = loads(response.read())
        except urllib.error.HTTPError as exc:
            raise TrytonError(f"HTTP {exc.code}", exc.read().decode(errors="replace"),
                              method) from None
        if body.get("error") is not None:
            error = body["error"]
            # TrytonException: [name, args], e.g. ["UserError", [message, description, domain]]
            # or ["UserWarning", [key, message, description]]; any other exception (a bug, or a
            # required value Tryton did not check, such as a missing journal at posting):
            # [str(exception), traceback], reported here as kind "ServerError".
            if isinstance(error, list) and len(error) == 2 and error[0] in TRYTON_EXCEPTIONS:
                raise TrytonError(error[0], error[1], method)
            raise TrytonError("ServerError", error, method)
        return body.get("result")

    def login(self) -> str:
        """``common.db.login`` -> [uid, token, ...]; returns the Session credential (base64)."""
        result = self._post(f"/{self.database}/rpc/", "common.db.login",
                            [self.user, {"password": self.password}, "en"])
        uid, token = result[0], result[1]
        self._session = base64.b64encode(f"{self.user}:{uid}:{token}".encode()).decode()
        self._context = None
        return self._session

    @property
    def session(self) -> str:
        return self._session or self.login()

    def refresh_context(self) -> dict:
        """Fetch the context again (after changing the user's company, say)."""
        self._context = None
        return self.context

    @property
    def context(self) -> dict:
        """The user's context (company, language, ...), fetched once from get_preferences."""
        if self._context is None:
            self._context = self.rpc("model.res.user.get_preferences", [True, {}])
        return dict(self._context)

    def rpc(self, method: str, params=()):
        """One JSON-RPC call on the database; raises TrytonError with Tryton's error."""
        try:
            return self._post(f"/{self.database}/rpc/", method, list(params), self.session)
        except TrytonError as exc:
            if exc.kind != "HTTP 401":
                raise
        self.login()  # session expired or server restarted: log in again, once
        return self._post(f"/{self.database}/rpc/", method, list(params), self.session)

    def call(self, model: str, method: str, *args, context: dict | None = None):
        """``model.<model>.<method>(*args, context)`` with the user's context (plus overrides)."""
        return self.rpc(f"model.{model}.{method}", [*args, {**self.context, **(context or {})}])

    # read helpers for assertions

    def parties(self, code: str | None = None) -> list[dict]:
        """Parties (all, or those with ``code``) as dicts: id, code, name, addresses."""
        domain = [] if code is None else [("code", "=", code)]
        return self.call("party.party", "search_read", domain, 0, None, [("id", "ASC")],
                         ["code", "name", "addresses"])

    def invoices(self, reference: str | None = None) -> list[dict]:
        """Customer invoices (all, or with ``reference``), oldest first, with their lines.

        Amounts are strings (``"185.00"``); each invoice carries party_code, party_name,
        state, number, reference, invoice_date, untaxed/total amount and ``lines``
        (description, product, quantity, unit_price, amount, note).
        """
        domain = [("type", "=", "out")]
        if reference is not None:
            domain.append(("reference", "=", reference))
        invoices = self.call(
            "account.invoice", "search_read", domain, 0, None, [("id", "ASC")],
            ["number", "reference", "state", "invoice_date", "party", "party.code",
             "party.name", "untaxed_amount", "tax_amount", "total_amount", "lines",
             "description"])
        line_ids = [line for invoice in invoices for line in invoice["lines"]]
        lines = {}
        if line_ids:
            for line in self.call("account.invoice.line", "read", line_ids,
                                  ["description", "product", "product.name", "quantity",
                                   "unit_price", "amount", "note", "account"]):
                lines[line["id"]] = {
                    "id": line["id"],
                    "description": line["description"],
                    "product": (line.get("product.") or {}).get("name"),
                    "quantity": line["quantity"],
                    "unit_price": _money(line["unit_price"]),
                    "amount": _money(line["amount"]),
                    "note": line["note"],
                    "account": line["account"],
                }
        result = []
        for invoice in invoices:
            party = invoice.get("party.") or {}
            result.append({
                "id": invoice["id"],
                "number": invoice["number"],
                "reference": invoice["reference"],
                "description": invoice["description"],
                "state": invoice["state"],
                "invoice_date": invoice["invoice_date"],
                "party": invoice["party"],
                "party_code": party.get("code"),
                "party_name": party.get("name"),
                "untaxed_amount": _money(invoice["untaxed_amount"]),
                "tax_amount": _money(invoice["tax_amount"]),
                "total_amount": _money(invoice["total_amount"]),
                "lines": [lines[i] for i in invoice["lines"]],
            })
        return result


def _money(value) -> str | None:
    """A Decimal as text with at least two decimals and no further trailing zeros:
    185 -> "185.00", Decimal("185.0000") -> "185.00", Decimal("12.3450") -> "12.345"."""
    if value is None:
        return None
    value = decimal.Decimal(value)
    if value.as_tuple().exponent < -2:
        value = value.normalize()
    if value.as_tuple().exponent > -2:
        value = value.quantize(decimal.Decimal("0.01"))
    return f"{value:f}"


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE):
        server.stop()


def _parent_death_signal():
    """A preexec_fn: the child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG), or None.

    Keeps a crashed or SIGKILLed test run from leaving trytond processes behind.  Linux sends it
    when the *thread* that started the server ends: start servers from a long-lived thread (the
    main thread, as pytest does), or pass ``die_with_parent=False``.  prctl is looked up here, in
    the parent, so the child only makes the call (nothing that could take a lock after fork).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        sigterm = int(signal.SIGTERM)
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, sigterm)  # 1 = PR_SET_PDEATHSIG

    return preexec


# -- pytest fixtures ----------------------------------------------------------------------------

def _skip_unless_available() -> None:
    """Skip the test when Tryton is missing, or fail when HL7BRIDGE_REQUIRE_TRYTON=1 (CI)."""
    import pytest

    reason = missing_reason()
    if reason:
        if os.environ.get("HL7BRIDGE_REQUIRE_TRYTON") == "1":
            pytest.fail(f"HL7BRIDGE_REQUIRE_TRYTON=1 but {reason}")
        pytest.skip(reason)


def _fixtures():
    import pytest

    @pytest.fixture(scope="session")
    def tryton_template() -> Path:
        """The cached ready-to-invoice template database (built on first use: about 15-20 s)."""
        _skip_unless_available()
        return prepare_template()

    @pytest.fixture
    def tryton_server(tryton_template, tmp_path):
        """A started TrytonServer on a private copy of the template, stopped after the test."""
        server = TrytonServer(tryton_template, workdir=tmp_path)
        try:
            yield server
        finally:
            server.stop()

    return tryton_template, tryton_server


try:  # the fixtures exist only where pytest does; the rest of this module needs just the stdlib
    import pytest as _pytest  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    tryton_template, tryton_server = _fixtures()


# -- command line -------------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    if argv[:1] == ["--build"] and len(argv) == 2:
        timings: dict = {}
        start = time.monotonic()
        target = Path(argv[1]).resolve()
        build_template(target, timings=timings)
        print(f"built {target} in {time.monotonic() - start:.1f} s "
              + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        return 0
    if argv[:1] == ["--serve"]:
        with TrytonServer(prepare_template()) as server:
            print(f"{server.url} user={server.user} password={server.password} "
                  f"(log {server.log_path}); Ctrl-C stops", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while server.process.poll() is None:
                    time.sleep(1)
        return 0
    print("usage: python tests/tryton.py --build PATH | --serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
