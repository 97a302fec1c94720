// Overview: message flow per route per hour, deliveries per destination, ACK latency, listeners.
import {api, el, put, table} from '../lib.js';

async function refresh() {
  const s = await api('summary');
  if (s.error) { put('overview-error', el('p', {id: 'overview-error', class: 'err'}, s.error)); return; }
  const most = Math.max(1, ...s.flow.map(f => f.messages));
  put('flow', table('flow', [
    ['hour (UTC)', f => f.hour.replace('T', ' ') + ':00'],
    ['route', f => f.route],
    ['messages', f => el('span', {}, el('span', {class: 'bar', style: 'width:' + Math.round(200 * f.messages / most) + 'px'}), f.messages)],
  ], s.flow));
  put('outbox', table('outbox', [
    ['destination', o => o.destination], ['pending', o => o.pending], ['in flight', o => o.in_flight],
    ['retrying', o => o.retrying], ['dead', o => o.dead], ['delivered', o => o.delivered],
    ['oldest undelivered', o => o.oldest_open || ''],
    // Messages a converter has still to map for this destination, and the deliveries of later
    // messages with the same ordering key that wait for them (per-key order).
    ['not converted yet', o => o.unconverted ? o.unconverted + ' (oldest ' + o.oldest_unconverted + ')' : 0],
    ['held for them', o => o.held],
  ], s.outbox, o => o.dead ? 'dead' : null));
  put('overview-listeners', table('overview-listeners', [
    ['listener', l => el('a', {href: '#listeners'}, l.name)], ['address', l => l.address || ''],
    ['connected peers', l => l.open],
  ], s.listeners));
  put('latency', el('p', {id: 'latency', class: 'note'}, s.ack_latency.count
    ? 'ACKs since the engine started: ' + s.ack_latency.count + ', mean ' + s.ack_latency.mean_ms + ' ms' : ''));
}

export default {
  id: 'overview', title: 'Overview', refresh,
  render(main) {
    main.append(el('p', {id: 'overview-error'}),
                el('h2', {}, 'Message flow, last 24 hours'), el('table', {id: 'flow'}),
                el('h2', {}, 'Deliveries'), el('table', {id: 'outbox'}), el('p', {id: 'latency'}),
                el('h2', {}, 'Listeners'), el('table', {id: 'overview-listeners'}));
    refresh();
  },
};
