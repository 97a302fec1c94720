// What every page of the dashboard uses: the API call, small DOM helpers, tables.
// No framework and nothing from the internet.

// POST /api/NAME with a JSON body; patient data never goes into a URL. A 401 means the
// sign-in expired: back to /login. Answers with the JSON, which has "error" when it failed.
export async function api(name, body) {
  let response;
  try {
    response = await fetch('/api/' + name, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                            body: JSON.stringify(body || {})});
  } catch (e) {
    return {error: 'the engine cannot be reached'};
  }
  if (response.status === 401) { location.href = '/login'; return {error: 'signed out'}; }
  try { return await response.json(); } catch (e) { return {error: 'HTTP ' + response.status}; }
}

// el('td', {class: 'x', onclick: f}, 'text', node, ...): an element with attributes and children.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A table: columns are [title, row => text or node]; rows of data. Keeps its id.
export function table(id, columns, rows, rowClass) {
  const head = el('tr', {}, columns.map(([title]) => el('th', {}, title)));
  const body = rows.map(row => el('tr', {class: rowClass ? rowClass(row) : null},
                                  columns.map(([, value]) => el('td', {}, value(row)))));
  return el('table', {id}, head, body.length ? body : [el('tr', {}, el('td', {colspan: columns.length, class: 'note'}, 'none'))]);
}

// Swap the element with this id for a new one (tables refreshed in place).
export function put(id, node) {
  const old = document.getElementById(id);
  if (old) old.replaceWith(node);
  return node;
}

export function messageType(m) {
  return (m.message_type || '') + (m.trigger_event ? '^' + m.trigger_event : '');
}

// A link to a message's page (its ID only in the URL: never patient data).
export function messageLink(id) {
  return el('a', {href: '#message/' + id, class: 'message-link'}, String(id));
}

export const session = {user: null, role: null};
