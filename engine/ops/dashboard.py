"""The operator's dashboard: a web page served by the engine, and the small JSON API behind it.

Mounted on the metrics site (``metrics.endpoint``, 127.0.0.1 by default) when ``dashboard.token``
is set. Everything but /healthz then needs the token: as ``Authorization: Bearer <token>`` (for
Prometheus and scripts) or a session cookie from /login, where the operator also gives a name that
replays are recorded under. No patient data ever goes into a URL: searches and message views are
POSTs with JSON bodies. Plain HTML and a little JavaScript, no external resources: it works with no
internet.
"""

from __future__ import annotations

import hmac
import json
import secrets
from datetime import datetime, timedelta, timezone

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..delivery.outbox import summarize
from ..store.base import SearchQuery, decode_notes
from ..transform.replay import ReplayError
from .detail import describe_message
from .status import Status

COOKIE = b"hl7bridge_session"


class Auth:
    """The dashboard token and the sessions opened with it (in memory: a restart logs everyone out)."""

    def __init__(self, token: str):
        self.token = token
        self.sessions: dict[str, str] = {}

    def user(self, request) -> str | None:
        header = request.getHeader(b"authorization") or b""
        if header.startswith(b"Bearer ") and hmac.compare_digest(header[7:].decode(errors="replace"), self.token):
            return "api"
        cookie = request.getCookie(COOKIE)
        return self.sessions.get(cookie.decode()) if cookie else None

    def login(self, name: str, token: str) -> str | None:
        if not hmac.compare_digest(token, self.token) or not name.strip():
            return None
        session = secrets.token_urlsafe(24)
        self.sessions[session] = name.strip()[:60]
        return session


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


class Login(Resource):
    isLeaf = True

    def __init__(self, auth: Auth):
        super().__init__()
        self.auth = auth

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return LOGIN_PAGE.encode()

    def render_POST(self, request):
        name = (request.args.get(b"name") or [b""])[0].decode(errors="replace")
        token = (request.args.get(b"token") or [b""])[0].decode(errors="replace")
        session = self.auth.login(name, token)
        if session is None:
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            return LOGIN_PAGE.replace("<!--error-->", "<p class=err>Wrong token, or no name.</p>").encode()
        request.addCookie(COOKIE, session.encode(), path=b"/", httpOnly=True, sameSite=b"strict")
        request.redirect(b"/dashboard")
        return b""


class Page(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return DASHBOARD_PAGE.encode()


class Api(Resource):
    """POST /api/<name> with a JSON body; answers JSON. Journal reads run in the engine's reader
    threads (``Status.read``), the replay in its writer thread: never on the reactor."""

    isLeaf = True

    def __init__(self, status: Status, auth: Auth):
        super().__init__()
        self.status, self.auth = status, auth

    def render_POST(self, request):
        name = request.postpath[0].decode() if request.postpath else ""
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            body = None
        handler = getattr(self, f"api_{name}", None)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if handler is None or not isinstance(body, dict):
            request.setResponseCode(404 if handler is None else 400)
            return json.dumps({"error": "unknown call or bad body"}).encode()

        def done(value):
            request.write(json.dumps(value, default=str).encode())
            request.finish()

        def failed(failure):
            request.setResponseCode(400)
            request.write(json.dumps({"error": failure.getErrorMessage()}).encode())
            request.finish()

        defer.maybeDeferred(handler, body, self.auth.user(request)).addCallbacks(done, failed)
        return NOT_DONE_YET

    def api_summary(self, body, user):
        since = (datetime.now(timezone.utc) - timedelta(hours=24)).strftime("%Y-%m-%dT%H")
        latency = self.status.ack_latency

        def read(journal):
            return {**journal.traffic(since), "outbox": summarize(journal.outbox_counts())}

        def page(found):
            return {"flow": found["flow"], "delivered": found["delivered"], "outbox": found["outbox"], "user": user,
                    "ack_latency": {"count": latency.count,
                                    "mean_ms": round(1000 * latency.total / latency.count, 3) if latency.count else None}}

        return self.status.read(read).addCallback(page)

    def api_exceptions(self, body, user):
        def read(journal):
            found = journal.exceptions(limit=50)
            for row in found["messages"]:
                problems = decode_notes(row.pop("problems", None))[0]
                if problems:
                    row["error"] = problems[0].split(" (from ")[0]
            return {"messages": found["messages"], "dead": journal.list_deliveries(state="dead", limit=50),
                    "differing": found["differing"]}

        return self.status.read(read)

    def api_search(self, body, user):
        fields = {k: body.get(k) or None for k in ("patient", "control_id", "appointment", "transaction",
                                                  "message_type", "status", "text")}
        query = SearchQuery(**fields, limit=min(int(body.get("limit") or 50), 200))
        return self.status.read(lambda journal: {"rows": journal.search(query)})

    def api_message(self, body, user):
        message_id = int(body.get("id", 0))

        def read(journal):
            record = journal.get(message_id)
            if record is None:
                return {"error": f"no message {message_id}"}
            record["conversion"] = journal.conversion(message_id)
            detail = describe_message(record)
            detail["deliveries"] = journal.deliveries_of(message_id)
            return detail

        return self.status.read(read)

    def api_replay(self, body, user):
        message_id = int(body.get("message_id", 0))
        destination = body.get("destination")
        why = (body.get("why") or "").strip() or "replayed from the dashboard"
        d = self.status.replay([message_id], [destination] if destination else None, f"dashboard:{user}", why)
        return d.addErrback(lambda failure: failure.trap(ReplayError) and {"error": failure.getErrorMessage()})


def mount(root: Resource, status: Status, token: str):
    """Add /login, /dashboard and /api to the metrics site and guard everything but /healthz."""
    auth = Auth(token)
    for name in (b"metrics", b"readyz"):
        root.children[name] = Guarded(root.children[name], auth)
    root.putChild(b"login", Login(auth))
    root.putChild(b"dashboard", Guarded(Page(), auth))
    root.putChild(b"api", Guarded(Api(status, auth), auth))
    return auth


LOGIN_PAGE = """<!doctype html><html><head><meta charset=utf-8><title>hl7bridge</title>
<style>body{font:14px system-ui,sans-serif;margin:4em auto;max-width:22em}input,button{display:block;width:100%;margin:.5em 0;padding:.4em}.err{color:#b00}</style>
</head><body><h1>hl7bridge</h1><!--error-->
<form method=post action=/login><label>Your name <input name=name id=name autocomplete=username></label>
<label>Dashboard token <input name=token id=token type=password autocomplete=current-password></label>
<button id=login>Sign in</button></form></body></html>"""

DASHBOARD_PAGE = """<!doctype html><html><head><meta charset=utf-8><title>hl7bridge dashboard</title>
<style>
body{font:13px system-ui,sans-serif;margin:1em 2em;color:#222}h2{margin-top:1.5em;font-size:15px}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
.bar{background:#4a7;height:10px;display:inline-block}.dead{color:#b00}button{cursor:pointer}
#detail{white-space:pre-wrap;font-family:monospace;background:#f6f6f6;padding:.5em;max-height:30em;overflow:auto}
input,select{margin-right:.5em}
</style></head><body>
<h1>hl7bridge</h1><div id=who></div>
<h2>Message flow, last 24 hours</h2><table id=flow><tr><th>hour (UTC)</th><th>route</th><th>messages</th></tr></table>
<h2>Deliveries</h2><table id=outbox><tr><th>destination</th><th>pending</th><th>retrying</th><th>dead</th><th>delivered</th><th>oldest open</th></tr></table>
<div id=latency></div>
<h2>Exceptions</h2>
<h3>Dead deliveries</h3><table id=dead><tr><th>message</th><th>control ID</th><th>destination</th><th>attempts</th><th>reason</th><th></th></tr></table>
<h3>Rejected messages and mapping errors</h3><table id=errors><tr><th>message</th><th>received</th><th>control ID</th><th>type</th><th>status</th><th>reason</th></tr></table>
<h3>Control IDs reused with different content</h3><table id=differing><tr><th>message</th><th>received</th><th>control ID</th><th>facility</th><th>type</th><th>status</th><th>first used by</th></tr></table>
<h2>Search</h2>
<form id=search><input id=q-patient placeholder="patient ID"><input id=q-control placeholder="control ID">
<input id=q-appointment placeholder="appointment ID"><input id=q-text placeholder="free text">
<select id=q-status><option value="">any status</option><option>accepted</option><option>mapped</option><option>mapping_error</option><option>unrouted</option><option>rejected</option><option>duplicate</option><option>held</option></select>
<button id=go>Search</button></form>
<table id=results></table>
<h2>Message</h2><div id=detail>(choose a message)</div>
<script>
async function call(name, body) {
  const r = await fetch('/api/' + name, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body || {})});
  if (r.status === 401) { location.href = '/login'; return {}; }
  return r.json();
}
function cell(text) { const td = document.createElement('td'); td.textContent = text == null ? '' : text; return td; }
function row(table, values) { const tr = document.createElement('tr'); values.forEach(v => tr.appendChild(v instanceof Node ? v : cell(v))); table.appendChild(tr); return tr; }
function clear(table) { while (table.rows.length > 1) table.deleteRow(1); }
function link(id) { const a = document.createElement('a'); a.href = '#'; a.textContent = id; a.onclick = e => { e.preventDefault(); show(id); }; const td = document.createElement('td'); td.appendChild(a); return td; }
async function refresh() {
  const s = await call('summary');
  document.getElementById('who').textContent = 'signed in as ' + s.user;
  const flow = document.getElementById('flow'); clear(flow);
  const most = Math.max(1, ...s.flow.map(f => f.messages));
  s.flow.forEach(f => { const bar = document.createElement('td'); bar.innerHTML = '<span class=bar style="width:' + Math.round(200 * f.messages / most) + 'px"></span> ' + f.messages; row(flow, [f.hour.replace('T', ' ') + ':00', f.route, bar]); });
  const outbox = document.getElementById('outbox'); clear(outbox);
  s.outbox.forEach(o => row(outbox, [o.destination, o.pending, o.retrying, o.dead, o.delivered, o.oldest_open]));
  document.getElementById('latency').textContent = s.ack_latency.count ? ('ACKs since start: ' + s.ack_latency.count + ', mean ' + s.ack_latency.mean_ms + ' ms') : '';
  const x = await call('exceptions');
  const dead = document.getElementById('dead'); clear(dead);
  x.dead.forEach(d => {
    const b = document.createElement('button'); b.textContent = 'Replay'; b.className = 'replay'; b.dataset.message = d.message_id;
    b.onclick = async () => { const why = prompt('Why replay?', 'replayed from the dashboard'); if (why === null) return;
      const r = await call('replay', {message_id: d.message_id, destination: d.destination, why: why});
      b.replaceWith(document.createTextNode(r.error ? r.error : 'queued again')); };
    const td = document.createElement('td'); td.appendChild(b);
    row(dead, [link(d.message_id), d.control_id, d.destination, d.attempts, d.last_error, td]).className = 'dead';
  });
  const errors = document.getElementById('errors'); clear(errors);
  x.messages.forEach(m => row(errors, [link(m.id), m.received_at, m.control_id, (m.message_type || '') + (m.trigger_event ? '^' + m.trigger_event : ''), m.status, m.error]));
  const differing = document.getElementById('differing'); clear(differing);
  (x.differing || []).forEach(m => row(differing, [link(m.id), m.received_at, m.control_id, m.sending_facility, (m.message_type || '') + (m.trigger_event ? '^' + m.trigger_event : ''), m.status, link(m.duplicate_of)]).className = 'differing');
}
async function show(id) {
  const d = await call('message', {id: id});
  if (d.error) { document.getElementById('detail').textContent = d.error; return; }
  const lines = [];
  for (const [k, v] of Object.entries(d.summary)) if (v !== null && v !== '' && v !== false) lines.push(k + ': ' + v);
  lines.push('');
  d.segments.forEach(s => { lines.push(s.segment); s.fields.forEach(f => lines.push('  ' + f.path + (f.name ? ' ' + f.name : '') + ': ' + f.value)); });
  lines.push('', 'ACK:', (d.ack || '(none)').split('\\r').join('\\n'));
  if (d.conversion) lines.push('', 'conversion: ' + d.conversion.status + ' (route ' + d.conversion.route + ')', ...(d.conversion.problems || []), ...(d.conversion.warnings || []).map(w => 'warning: ' + w));
  (d.deliveries || []).forEach(x => lines.push('delivery to ' + x.destination + ': ' + x.state + ' after ' + x.attempts + ' attempt(s)' + (x.last_error ? ' (' + x.last_error + ')' : '')));
  document.getElementById('detail').textContent = lines.join('\\n');
}
document.getElementById('search').onsubmit = async e => {
  e.preventDefault();
  const v = id => document.getElementById(id).value;
  const r = await call('search', {patient: v('q-patient'), control_id: v('q-control'), appointment: v('q-appointment'), text: v('q-text'), status: v('q-status')});
  const t = document.getElementById('results'); t.innerHTML = '<tr><th>message</th><th>received</th><th>control ID</th><th>type</th><th>patient</th><th>status</th></tr>';
  (r.rows || []).forEach(m => row(t, [link(m.id), m.received_at, m.control_id, (m.message_type || '') + (m.trigger_event ? '^' + m.trigger_event : ''), m.patient_id, m.status]));
};
refresh(); setInterval(refresh, 5000);
</script></body></html>"""

