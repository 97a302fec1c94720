// Messages: the journal page by page over a time range, filtered by facility, type, route,
// status, delivery state, patient (ID or ID^^^AUTHORITY), control ID or free text; select
// messages to replay them. The filters travel in POST bodies, never in the URL.
import {api, el, messageLink, messageType, put, session, table} from '../lib.js';

const PAGE_SIZES = [10, 25, 50, 100, 200];
const FILTERS = [  // [id, label, body key, placeholder]
  ['f-since', 'from', 'since', '24h, 7d or 2026-11-24T06:00'],
  ['f-until', 'to', 'until', 'now'],
  ['f-facility', 'sending facility', 'facility', 'MSH-4'],
  ['f-type', 'type', 'type', 'SIU or SIU^S12'],
  ['f-patient', 'patient', 'patient', 'ID or ID^^^AUTHORITY'],
  ['f-control', 'control ID', 'control_id', 'MSH-10'],
  ['f-text', 'free text', 'text', 'anywhere in the message'],
];
// The filters and the page stay while the operator looks at a message and comes back.
const state = {filters: {}, pages: [null], page: 0, rows: [], next: null, selected: new Set(), searched: false, limit: 50};

function select(id, label, values, chosen) {
  return el('label', {}, label, el('select', {id}, el('option', {value: ''}, 'any'),
    values.map(v => el('option', {value: v, selected: v === chosen}, v))));
}

function readFilters() {
  const f = {};
  for (const [id, , name] of FILTERS) f[name] = document.getElementById(id).value.trim();
  for (const [id, name] of [['f-route', 'route'], ['f-status', 'status'], ['f-destination', 'destination'],
                            ['f-delivery-state', 'delivery_state']]) f[name] = document.getElementById(id).value;
  f.oldest_first = document.getElementById('f-oldest').checked;
  state.limit = Number(document.getElementById('f-limit').value);
  return f;
}

async function load() {
  const after = state.pages[state.page];
  const found = await api('messages', {...state.filters, limit: state.limit, after});
  if (found.error) { put('messages-note', el('p', {id: 'messages-note', class: 'err'}, found.error)); return; }
  state.rows = found.rows; state.next = found.next; state.searched = true;
  draw();
}

function draw() {
  const operator = session.role === 'operator';
  const columns = [];
  if (operator) columns.push(['', m => el('input', {type: 'checkbox', class: 'pick', dataset: {id: m.id},
    checked: state.selected.has(m.id),
    onchange: e => { e.target.checked ? state.selected.add(m.id) : state.selected.delete(m.id); count(); }})]);
  columns.push(['message', m => messageLink(m.id)], ['received', m => m.received_at], ['control ID', m => m.control_id],
    ['facility', m => m.sending_facility], ['type', messageType], ['patient', m => m.patient], ['route', m => m.route || ''],
    ['status', m => m.status],
    ['deliveries', m => el('span', {}, (m.deliveries || []).map((d, i) =>
      el('span', {class: 'state-' + d.state}, (i ? ', ' : '') + d.destination + ': ' + d.state)))]);
  const t = put('messages', table('messages', columns, state.rows));
  if (operator) {  // the header cell: a checkbox that selects the whole page
    const all = el('input', {type: 'checkbox', id: 'select-all', title: 'select this page',
      checked: state.rows.length > 0 && state.rows.every(r => state.selected.has(r.id)),
      onchange: e => { state.rows.forEach(r => e.target.checked ? state.selected.add(r.id) : state.selected.delete(r.id)); draw(); }});
    t.rows[0].cells[0].replaceChildren(all);
  }
  const first = state.page * state.limit + 1;
  put('messages-note', el('p', {id: 'messages-note', class: 'note'}, state.rows.length
    ? 'messages ' + first + ' to ' + (first + state.rows.length - 1) + (state.next ? '' : ' (the last page)') : 'no messages match'));
  document.getElementById('newer').disabled = state.page === 0;
  document.getElementById('older').disabled = !state.next;
  count();
}

function count() {
  const n = document.getElementById('selected-count');
  if (n) n.textContent = state.selected.size ? state.selected.size + ' selected' : '';
}

async function replaySelected() {
  const ids = [...state.selected];
  if (!ids.length) return;
  const destination = document.getElementById('replay-destination').value;
  const result = await api('replay', {items: ids.map(id => ({message_id: id, destination: destination || null})),
    why: document.getElementById('replay-why').value, remap: document.getElementById('replay-remap').checked});
  put('replay-result', el('p', {id: 'replay-result', class: result.error ? 'err' : 'ok'}, result.error ? result.error
    : 'queued again: ' + result.deliveries + ' deliveries of ' + result.messages + ' message(s)'
      + (Object.keys(result.remapped || {}).length ? '; mapped again: ' + Object.entries(result.remapped).map(([s, n]) => n + ' ' + s).join(', ') : '')));
  if (!result.error) { state.selected.clear(); load(); }
}

export default {
  id: 'messages', title: 'Messages',
  render(main) {
    const o = session.options || {};
    const f = state.filters;
    const form = el('form', {id: 'filters', class: 'filters', onsubmit: e => {
      e.preventDefault(); state.filters = readFilters(); state.pages = [null]; state.page = 0; state.selected.clear(); load();
    }},
      FILTERS.map(([id, label, name, hint]) => el('label', {}, label, el('input', {id, value: f[name] || '', placeholder: hint}))),
      select('f-route', 'route', o.routes || [], f.route),
      select('f-status', 'status', o.statuses || [], f.status),
      select('f-destination', 'destination', o.destinations || [], f.destination),
      select('f-delivery-state', 'delivery state', o.delivery_states || [], f.delivery_state),
      el('label', {}, 'per page', el('select', {id: 'f-limit'}, PAGE_SIZES.map(n => el('option', {value: n, selected: n === state.limit}, n)))),
      el('label', {}, 'oldest first', el('input', {type: 'checkbox', id: 'f-oldest', checked: !!f.oldest_first})),
      el('button', {id: 'f-go'}, 'Search'));
    const operator = session.role === 'operator';
    main.append(form,
      el('div', {class: 'actions'},
        el('button', {id: 'newer', disabled: true, onclick: () => { state.page -= 1; load(); }}, '< Newer'),
        el('button', {id: 'older', disabled: true, onclick: () => { state.pages[state.page + 1] = state.next; state.page += 1; load(); }}, 'Older >'),
        el('span', {id: 'messages-note'})),
      operator ? el('div', {class: 'actions'},
        el('span', {id: 'selected-count'}),
        el('select', {id: 'replay-destination'}, el('option', {value: ''}, 'to all their destinations'),
          (o.destinations || []).map(d => el('option', {value: d}, 'to ' + d + ' only'))),
        el('label', {}, el('input', {type: 'checkbox', id: 'replay-remap'}), ' map again first'),
        el('input', {type: 'text', id: 'replay-why', placeholder: 'why (recorded with the replay)'}),
        el('button', {id: 'replay-selected', onclick: replaySelected}, 'Replay selected')) : null,
      el('p', {id: 'replay-result'}),
      el('table', {id: 'messages'}));
    if (state.searched) draw(); else { state.filters = readFilters(); load(); }
  },
};
