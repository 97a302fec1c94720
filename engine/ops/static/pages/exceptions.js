// Exceptions: what needs an operator. Dead deliveries (with what the server said, replay one or
// a selection), rejected messages, mapping errors and held messages, unrouted messages, and
// control IDs reused with different content.
import {api, el, messageLink, messageType, put, session, table} from '../lib.js';

const selected = new Set();  // "messageID:destination" of the dead deliveries ticked, kept across refreshes

function key(d) { return d.message_id + ':' + d.destination; }

async function replay(items, why) {
  const result = await api('replay', {items, why: why || 'replayed from the dashboard'});
  const text = result.error ? result.error
    : 'queued again: ' + result.deliveries + ' deliveries of ' + result.messages + ' message(s)';
  put('dead-result', el('p', {id: 'dead-result', class: result.error ? 'err' : 'ok'}, text));
  if (!result.error) { items.forEach(i => selected.delete(i.message_id + ':' + i.destination)); refresh(); }
  return result;
}

function deadTable(dead) {
  const operator = session.role === 'operator';
  const columns = [];
  if (operator) columns.push(['', d => el('input', {type: 'checkbox', class: 'pick', checked: selected.has(key(d)),
    onchange: e => e.target.checked ? selected.add(key(d)) : selected.delete(key(d))})]);
  columns.push(['message', d => messageLink(d.message_id)], ['control ID', d => d.control_id],
               ['destination', d => d.destination], ['attempts', d => d.attempts_total], ['reason', d => d.reason || '']);
  if (operator) columns.push(['', d => el('button', {class: 'replay', dataset: {message: d.message_id},
    onclick: () => replay([{message_id: d.message_id, destination: d.destination}], document.getElementById('dead-why').value)},
    'Replay')]);
  return table('dead', columns, dead, () => 'dead');
}

async function refresh() {
  const x = await api('exceptions');
  if (x.error) { put('dead-result', el('p', {id: 'dead-result', class: 'err'}, x.error)); return; }
  put('dead', deadTable(x.dead));
  put('errors', table('errors', [
    ['message', m => messageLink(m.id)], ['received', m => m.received_at], ['control ID', m => m.control_id],
    ['type', messageType], ['status', m => m.status], ['reason', m => m.error || ''],
  ], x.messages));
  put('unrouted', table('unrouted', [
    ['message', m => messageLink(m.id)], ['received', m => m.received_at], ['control ID', m => m.control_id],
    ['facility', m => m.sending_facility], ['type', messageType],
  ], x.unrouted));
  put('differing', table('differing', [
    ['message', m => messageLink(m.id)], ['received', m => m.received_at], ['control ID', m => m.control_id],
    ['facility', m => m.sending_facility], ['type', messageType], ['status', m => m.status],
    ['first used by', m => messageLink(m.duplicate_of)],
  ], x.differing));
}

export default {
  id: 'exceptions', title: 'Exceptions', refresh,
  render(main) {
    const operator = session.role === 'operator';
    main.append(
      el('h2', {}, 'Dead deliveries'),
      operator ? el('div', {class: 'actions'},
        el('label', {}, 'Why ', el('input', {type: 'text', id: 'dead-why', placeholder: 'recorded with the replay'})),
        el('button', {id: 'dead-replay', onclick: () => {
          const items = [...selected].map(k => { const [m, ...d] = k.split(':'); return {message_id: Number(m), destination: d.join(':')}; });
          if (items.length) replay(items, document.getElementById('dead-why').value);
        }}, 'Replay selected')) : el('p', {class: 'note'}, 'Replays need the operator role.'),
      el('p', {id: 'dead-result'}), el('table', {id: 'dead'}),
      el('h2', {}, 'Rejected messages, mapping errors and held messages'), el('table', {id: 'errors'}),
      el('h2', {}, 'Unrouted messages (no route takes them)'), el('table', {id: 'unrouted'}),
      el('h2', {}, 'Control IDs reused with different content'), el('table', {id: 'differing'}));
    refresh();
  },
};
