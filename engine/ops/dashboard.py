"""The operator's dashboard: sign-in, the page and its scripts (``static/``), and the JSON API.

Mounted on the metrics site (``metrics.endpoint``, 127.0.0.1 by default) when ``hl7bridge.yaml``
has a ``dashboard`` section. Everything but /healthz then needs a token: as
``Authorization: Bearer <token>`` (Prometheus, scripts) or a session cookie from /login.

Who signs in: with ``dashboard.users`` each operator has a name and a token of their own (and a
role: ``operator`` may replay, ``viewer`` only reads); with one shared ``dashboard.token`` the
operator gives a name at sign-in. Replays are recorded under that name (``dashboard:NAME``).

The page is plain HTML, CSS and JavaScript modules from ``static/`` (package data), no external
resources: it works with no internet. ``/dashboard`` is its shell; the scripts call the API
(``engine.ops.dashapi``: ``POST /api/NAME`` with a JSON body). No patient data ever goes into a
URL: filters and message views travel in POST bodies.

Layout, for the next page: ``static/app.js`` (the shell: navigation, the API call, table helpers)
imports one module per page from ``static/pages/`` (listed in its PAGES); a page's calls live in
``dashapi`` under ``@call(...)``.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .dashapi import CALLS, CallError, User
from .status import Status

log = Logger(namespace="hl7bridge.dashboard")
COOKIE = b"hl7bridge_session"
STATIC = Path(__file__).resolve().parent / "static"
SESSION_IDLE = 12 * 3600  # seconds of no use after which a sign-in expires
CONTENT_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                 ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml", ".png": b"image/png",
                 ".txt": b"text/plain; charset=utf-8"}


class Auth:
    """The dashboard's tokens and the sessions opened with them (in memory: a restart signs
    everyone out). ``settings`` is an ``engine.config.DashboardSettings``."""

    def __init__(self, settings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self.sessions: dict[str, tuple[User, float]] = {}

    def _token_user(self, token: str, name: str | None = None) -> User | None:
        """Whose token this is: a user's own (whose name must match, when one is given), or the
        shared token with the name given (None for a script: "api")."""
        if self.settings.users:
            user = self.settings.user_with_token(token)
            if user is None or (name is not None and name != user.name):
                return None
            return User(user.name, user.role)
        if self.settings.token and hmac.compare_digest(token.encode(), self.settings.token.encode()):
            return User(name if name is not None else "api")
        return None

    def user(self, request) -> User | None:
        header = request.getHeader(b"authorization") or b""
        if header.startswith(b"Bearer "):
            return self._token_user(header[7:].decode(errors="replace"))
        cookie = request.getCookie(COOKIE)
        if not cookie:
            return None
        found = self.sessions.get(cookie.decode(errors="replace"))
        if found is None:
            return None
        user, last = found
        now = self.clock()
        if now - last > SESSION_IDLE:
            del self.sessions[cookie.decode()]
            return None
        self.sessions[cookie.decode()] = (user, now)
        return user

    def login(self, name: str, token: str) -> str | None:
        name = name.strip()[:60]
        if not name:
            return None
        user = self._token_user(token, name)
        if user is None:
            return None
        now = self.clock()
        for old in [key for key, (_, last) in self.sessions.items() if now - last > SESSION_IDLE]:
            del self.sessions[old]  # sign-ins nobody came back to
        session = secrets.token_urlsafe(24)
        self.sessions[session] = (user, now)
        return session

    def logout(self, request):
        cookie = request.getCookie(COOKIE)
        if cookie:
            self.sessions.pop(cookie.decode(errors="replace"), None)


class Guarded(Resource):
    """Wraps a resource: without a valid token or session, 401 (API) or a redirect to /login."""

    isLeaf = True  # every guarded resource is a leaf: the inner one reads request.postpath itself

    def __init__(self, inner: Resource, auth: Auth):
        super().__init__()
        self.inner, self.auth = inner, auth

    def render(self, request):
        if self.auth.user(request) is None:
            return Denied().render(request)
        return self.inner.render(request)


class Denied(Resource):
    isLeaf = True

    def render(self, request):
        if request.path.startswith(b"/dashboard"):
            request.redirect(b"/login")
            return b""
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"a dashboard token or session is required\n"


def _page(name: str) -> bytes:
    return (STATIC / name).read_bytes()


class Login(Resource):
    isLeaf = True

    def __init__(self, auth: Auth):
        super().__init__()
        self.auth = auth

    def _form(self, request, error: str = ""):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        page = _page("login.html").decode()
        label = "Your user name" if self.auth.settings.users else "Your name (replays are recorded under it)"
        token = "Your token" if self.auth.settings.users else "Dashboard token"
        page = page.replace("{{name_label}}", label).replace("{{token_label}}", token)
        return page.replace("<!--error-->", f"<p class=err>{error}</p>" if error else "").encode()

    def render_GET(self, request):
        return self._form(request)

    def render_POST(self, request):
        name = (request.args.get(b"name") or [b""])[0].decode(errors="replace")
        token = (request.args.get(b"token") or [b""])[0].decode(errors="replace")
        session = self.auth.login(name, token)
        if session is None:
            request.setResponseCode(401)
            return self._form(request, "Wrong name or token." if self.auth.settings.users else "Wrong token, or no name.")
        request.addCookie(COOKIE, session.encode(), path=b"/", httpOnly=True, sameSite=b"strict")
        request.redirect(b"/dashboard")
        return b""


class Logout(Resource):
    isLeaf = True

    def __init__(self, auth: Auth):
        super().__init__()
        self.auth = auth

    def render_POST(self, request):
        self.auth.logout(request)
        request.addCookie(COOKIE, b"", path=b"/", httpOnly=True, sameSite=b"strict", max_age=b"0")
        request.redirect(b"/login")
        return b""


class Static(Resource):
    """The page's files: ``/dashboard`` is the shell (index.html), ``/static/...`` the rest."""

    isLeaf = True

    def __init__(self, shell: bool = False):
        super().__init__()
        self.shell = shell

    def render_GET(self, request):
        parts = [] if self.shell else [p.decode(errors="replace") for p in request.postpath if p]
        name = "index.html" if self.shell else "/".join(parts)
        path = (STATIC / name).resolve()
        if STATIC not in path.parents or not path.is_file() or path.suffix not in CONTENT_TYPES:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"Content-Type", CONTENT_TYPES[path.suffix])
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return path.read_bytes()


class Api(Resource):
    """``POST /api/NAME`` with a JSON body; answers JSON (``engine.ops.dashapi``)."""

    isLeaf = True

    def __init__(self, status: Status, auth: Auth):
        super().__init__()
        self.status, self.auth = status, auth

    def render_POST(self, request):
        name = request.postpath[0].decode(errors="replace") if request.postpath else ""
        handler = CALLS.get(name)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        user = self.auth.user(request)
        if request.getCookie(COOKIE) and not (request.getHeader("content-type") or "").startswith("application/json"):
            # A browser form from another site cannot send JSON: this keeps cross-site posts out.
            request.setResponseCode(415)
            return json.dumps({"error": "send a JSON body (Content-Type: application/json)"}).encode()
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            body = None
        if handler is None or not isinstance(body, dict):
            request.setResponseCode(404 if handler is None else 400)
            return json.dumps({"error": f"no call {name!r}" if handler is None else "the body must be a JSON object"}).encode()
        if handler.operator_only and user.role != "operator":
            request.setResponseCode(403)
            return json.dumps({"error": f"{user.name} is a viewer: this needs the operator role"}).encode()

        def done(value):
            request.write(json.dumps(value, default=str).encode())
            request.finish()

        def failed(failure):
            error = failure.value
            request.setResponseCode(error.code if isinstance(error, CallError) else 500)
            request.write(json.dumps({"error": failure.getErrorMessage() if isinstance(error, CallError)
                                      else "the engine could not answer; its log says why"}).encode())
            request.finish()
            if not isinstance(error, CallError):
                log.failure("dashboard call {name} failed", failure, name=name)

        defer.maybeDeferred(handler, self.status, body, user).addCallbacks(done, failed)
        return NOT_DONE_YET


def mount(root: Resource, status: Status, settings) -> Auth:
    """Add /login, /logout, /dashboard, /static and /api to the metrics site, and guard everything
    but /healthz and /login."""
    auth = Auth(settings)
    for name in (b"metrics", b"readyz"):
        root.children[name] = Guarded(root.children[name], auth)
    root.putChild(b"login", Login(auth))
    root.putChild(b"logout", Logout(auth))
    root.putChild(b"dashboard", Guarded(Static(shell=True), auth))
    root.putChild(b"static", Guarded(Static(), auth))
    root.putChild(b"api", Guarded(Api(status, auth), auth))
    return auth
