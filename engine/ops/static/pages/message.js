// One message (#message/ID), in tabs: the HL7 as received (its segments, and every field by
// name), the FHIR Bundle it was mapped to, each delivery's attempts with the server's response
// bodies and the replays, and the ACK that was sent.
import {api, el, session, table} from '../lib.js';

const TABS = [['hl7', 'HL7'], ['bundle', 'FHIR Bundle'], ['deliveries', 'Deliveries'], ['ack', 'ACK']];
let shown = 'hl7';

function fields(segments) {
  return el('table', {class: 'fields'}, el('tr', {}, el('th', {}, 'field'), el('th', {}, 'name'), el('th', {}, 'value')),
    segments.map(s => [el('tr', {}, el('td', {class: 'segment', colspan: 3}, s.segment)),
      s.fields.map(f => el('tr', {}, el('td', {}, f.path), el('td', {}, f.name || ''), el('td', {}, f.value)))]));
}

function hl7Tab(d) {
  return [el('pre', {id: 'raw'}, (d.raw || '').split(/\r\n|\r|\n/).filter(Boolean).join('\n')), fields(d.segments)];
}

function bundleTab(d) {
  const c = d.conversion;
  if (!c) return [el('p', {class: 'note'}, d.summary.route ? 'not mapped yet' : 'no conversion: no route took this message')];
  return [el('p', {}, 'conversion: ' + c.status + ' by route ' + c.route + ' at ' + c.converted_at),
    (c.problems || []).length ? el('ul', {class: 'err'}, c.problems.map(p => el('li', {}, p))) : null,
    (c.warnings || []).length ? el('ul', {class: 'warn'}, c.warnings.map(w => el('li', {}, 'assumed: ' + w))) : null,
    c.bundle ? el('pre', {id: 'bundle'}, JSON.stringify(c.bundle, null, 2)) : null];
}

function deliveryTitle(x) {
  let text = x.destination + ': ' + x.state + ' after ' + x.attempts + ' attempt(s)';
  if (x.replayed && x.attempts_since_replay !== x.attempts) text += ', ' + x.attempts_since_replay + ' since it was replayed';
  return text;
}

function deliveriesTab(d) {
  if (!(d.deliveries || []).length) return [el('p', {class: 'note'}, 'no deliveries')];
  return d.deliveries.map(x => el('div', {class: 'delivery'},
    el('h3', {class: 'state-' + x.state}, deliveryTitle(x)),
    x.reason ? el('p', {class: x.state === 'delivered' ? 'note' : 'err'}, x.reason) : null,
    x.waits_for ? el('p', {class: 'warn waits-for'}, 'waits for ' + x.waits_for) : null,
    x.events.map(e => e.kind === 'replay'
      ? el('p', {class: 'note'}, e.at + '  replayed by ' + e.who + ': ' + e.why + (e.remapped ? ' (mapped again)' : ''))
      : el('div', {class: 'attempt'},
          el('p', {}, e.at + '  ' + e.outcome + (e.status ? ' HTTP ' + e.status : '') + '  ' + Math.round(e.duration_ms || 0) + ' ms'),
          (e.server_said || []).length ? el('ul', {}, e.server_said.map(s => el('li', {}, s))) : null,
          e.response ? el('pre', {class: 'response'}, e.response) : null))));
}

function ackTab(d) {
  if (!d.ack) return [el('p', {class: 'note'}, 'no ACK was sent (the sender asked for none)')];
  return [el('pre', {id: 'ack-raw'}, d.ack.split(/\r\n|\r|\n/).filter(Boolean).join('\n')), fields(d.ack_segments || [])];
}

const RENDER = {hl7: hl7Tab, bundle: bundleTab, deliveries: deliveriesTab, ack: ackTab};

function summary(d) {
  const s = d.summary;
  const pairs = [['message', s.id], ['received', s.received_at], ['from', (s.peer || '') + ' on listener ' + (s.listener || '')],
    ['control ID', s.control_id], ['type', (s.message_type || '') + (s.trigger_event ? '^' + s.trigger_event : '')],
    ['facility', s.sending_facility], ['patient', s.patient], ['route', s.route], ['status', s.status],
    ['error', s.error], ['warning', s.warning], ['duplicate of', s.duplicate_of], ['ACK code', s.ack_code]];
  return el('dl', {class: 'summary', id: 'summary'}, pairs.filter(([, v]) => v !== null && v !== undefined && v !== '')
    .map(([k, v]) => [el('dt', {}, k), el('dd', {}, String(v))]));
}

async function replayOne(d) {
  const why = document.getElementById('message-why').value;
  const result = await api('replay', {items: [{message_id: d.summary.id}], why,
                                      remap: document.getElementById('message-remap').checked});
  document.getElementById('message-replayed').textContent = result.error ? result.error
    : 'queued again: ' + result.deliveries + ' deliveries';
}

export default {
  id: 'message', title: 'Message', nav: false,
  async render(main, argument) {
    main.append(el('p', {}, el('a', {href: '#messages'}, '< back to the messages')));
    const d = await api('message', {id: Number(argument)});
    if (d.error) { main.append(el('p', {class: 'err', id: 'detail'}, d.error)); return; }
    const body = el('div', {class: 'tab', id: 'detail-body'});
    const tabs = el('div', {class: 'tabs'}, TABS.map(([id, title]) => el('button', {id: 'tab-' + id,
      class: id === shown ? 'current' : null, onclick: e => {
        shown = id; tabs.querySelectorAll('button').forEach(b => b.classList.toggle('current', b === e.target));
        body.replaceChildren(...RENDER[id](d).filter(Boolean));
      }}, title)));
    main.append(el('div', {id: 'detail'}, el('h2', {}, 'Message ' + d.summary.id), summary(d),
      session.role === 'operator' ? el('div', {class: 'actions'},
        el('input', {type: 'text', id: 'message-why', placeholder: 'why (recorded with the replay)'}),
        el('label', {}, el('input', {type: 'checkbox', id: 'message-remap'}), ' map again first'),
        el('button', {id: 'message-replay', onclick: () => replayOne(d)}, 'Replay'),
        el('span', {id: 'message-replayed'})) : null,
      tabs, body));
    body.replaceChildren(...RENDER[shown](d).filter(Boolean));
  },
};
