// Scheduling to cash: the revenue-cycle work queues (appointments with no charge, late charges,
// charges with no appointment, charges the ERP has not posted), each exception's messages and
// acknowledgement, the KPIs per facility, and charts of the engine's traffic and charge lag.
// Charts are drawn with uPlot (vendored from npm in static/vendor/, MIT), no internet needed.
import {api, el, messageLink, put, session, table} from '../lib.js';

const KINDS = {
  missed_charge: 'Missed charge', late_charge: 'Late charge',
  charge_without_appointment: 'Charge without appointment', erp_not_posted: 'Not posted to the ERP',
};
const COLORS = ['#1f6fb2', '#2a8a57', '#c0392b', '#e67e22', '#8e44ad', '#555'];
const charts = {};

function filters() {
  const value = id => document.getElementById(id).value;
  return {since: value('rc-since'), facility: value('rc-facility') || null, kind: value('rc-kind') || null,
          acknowledged: document.getElementById('rc-acknowledged').checked};
}

async function acknowledge(item) {
  const note = document.getElementById('rc-note').value.trim();
  if (!note) {
    put('rc-result', el('p', {id: 'rc-result', class: 'err'}, 'Write a note first: what was done about it.'));
    return;
  }
  const result = await api('reconcile_ack', {id: item.id, note});
  put('rc-result', el('p', {id: 'rc-result', class: result.error ? 'err' : 'ok'},
                      result.error || 'acknowledged ' + item.id));
  if (!result.error) refresh();
}

function deliveries(list) {
  return (list || []).map(d => el('span', {class: 'state-' + d.state},
    d.destination + ': ' + d.state + (d.last_error ? ' (' + d.last_error + ')' : '') + ' '));
}

async function detail(item) {
  const found = await api('reconcile_detail', {id: item.id});
  const parts = [el('h3', {}, item.id)];
  if (found.error) parts.push(el('p', {class: 'err'}, found.error));
  if (found.charge) {
    const c = found.charge;
    parts.push(el('dl', {class: 'summary'},
      el('dt', {}, 'charge line'), el('dd', {}, (c.transaction_id || c.charge_key) + ' (' + c.kind + ', ' + c.code + ')'),
      el('dt', {}, 'amount'), el('dd', {}, c.amount === null ? '' : c.amount.toFixed(2) + ' ' + (c.currency || '')),
      el('dt', {}, 'service, made'), el('dd', {}, (c.service_at || '-') + ', ' + c.made_at),
      el('dt', {}, 'linked to'), el('dd', {}, c.appointment_id ? c.appointment_id + ' by ' + c.link_rule : 'no appointment'),
      el('dt', {}, 'messages'), el('dd', {}, c.message_ids.map(id => [messageLink(id), ' '])),
      el('dt', {}, 'deliveries'), el('dd', {}, deliveries(c.deliveries))));
  }
  if (found.appointment) {
    const a = found.appointment;
    parts.push(el('dl', {class: 'summary'},
      el('dt', {}, 'appointment'), el('dd', {}, a.appointment_id + ' (' + a.status + ')'),
      el('dt', {}, 'start'), el('dd', {}, a.start_at || ''),
      el('dt', {}, 'location, provider'), el('dd', {}, (a.location || '-') + ', ' + (a.provider || '-'))));
    parts.push(table('rc-history', [
      ['when', e => e.occurred_at], ['event', e => e.event + ' (' + e.trigger + ')'], ['status', e => e.status || ''],
      ['start', e => e.start_at || ''], ['message', e => messageLink(e.message_id)],
    ], a.history));
    parts.push(table('rc-charges', [
      ['charge line', c => c.transaction_id || c.charge_key], ['kind', c => c.kind], ['made', c => c.made_at],
      ['amount', c => c.amount === null ? '' : c.amount.toFixed(2)], ['rule', c => c.link_rule],
      ['deliveries', c => deliveries(c.deliveries)],
    ], a.charges || []));
  }
  put('rc-detail', el('div', {id: 'rc-detail'}, parts));
}

function queue(items) {
  const operator = session.role === 'operator';
  const columns = [
    ['kind', e => [el('span', {class: 'kind kind-' + e.kind}), KINDS[e.kind]]],
    ['facility', e => e.facility], ['appointment', e => e.appointment_id || ''],
    ['charge', e => e.transaction_id || ''], ['patient', e => e.patient_id || ''], ['reason', e => e.reason],
    ['messages', e => e.message_ids.map(id => [messageLink(id), ' '])],
    ['', e => el('button', {class: 'rc-show', onclick: () => detail(e)}, 'Details')],
  ];
  if (operator) columns.push(['', e => e.acknowledged
    ? 'acknowledged by ' + e.acknowledged.who + ': ' + e.acknowledged.note
    : el('button', {class: 'rc-ack', dataset: {id: e.id}, onclick: () => acknowledge(e)}, 'Acknowledge')]);
  return table('rc-queue', columns, items, e => e.acknowledged ? 'acknowledged' : null);
}

function hours(lag) { return lag ? lag.p50_hours + ' / ' + lag.p90_hours : '-'; }
function rate(value) { return value === null ? '-' : (100 * value).toFixed(1) + '%'; }

function kpis(found) {
  const rows = Object.entries(found).map(([facility, k]) => ({facility, ...k}));
  return table('rc-kpis', [
    ['facility', k => k.facility], ['appointments', k => k.appointments],
    ['missed charges', k => k.missed_charges + ' (' + rate(k.missed_charge_rate) + ')'],
    ['no-show rate', k => rate(k.no_show_rate)], ['same-day cancellations', k => k.same_day_cancellations],
    ['charge lines', k => k.charges], ['not posted', k => k.charges_not_posted],
    ['service → charge, h (p50 / p90)', k => hours(k.lag.service_to_charge)],
    ['charge → posted, h (p50 / p90)', k => hours(k.lag.charge_to_posted)],
  ], rows);
}

// One uPlot chart in the element with this id, replaced on every refresh. Each series may name
// its scale (``scale``: the units on the left axis, or a second one on the right); ``categories``
// makes the x axis a list of names (bars, one group per name).
function chart(id, title, x, series, options) {
  const box = document.getElementById(id);
  if (!box || !window.uPlot) return;
  if (charts[id]) charts[id].destroy();
  const opts = options || {};
  const units = [...new Set(series.map(s => s.scale || opts.unit || 'y'))];
  const scales = {x: opts.categories ? {time: false, range: [-0.5, opts.categories.length - 0.5]} : {time: true}};
  units.forEach(u => { scales[u] = {auto: true, range: (self, min, max) => [0, Math.max(1, max * 1.1)]}; });
  const axes = [opts.categories ? {values: (u, ticks) => ticks.map(t => opts.categories[t] ?? ''),
                                   splits: () => opts.categories.map((c, i) => i)} : {},
                ...units.map((u, i) => ({scale: u, label: u === 'y' ? '' : u, side: i ? 1 : 3,
                                         grid: {show: i === 0}}))];
  const width = Math.max(300, box.clientWidth || 560);
  charts[id] = new window.uPlot({
    title, width, height: 200, scales, axes,
    series: [{}, ...series.map((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const item = {label: s.label, scale: s.scale || opts.unit || 'y', stroke: color, width: 2,
                    points: {show: true, size: 4}};
      if (opts.bars) {
        Object.assign(item, {fill: color + 'aa', points: {show: false},
          paths: window.uPlot.paths.bars({size: [0.35, 60], align: i % 2 ? 1 : -1})});
      }
      return item;
    })],
  }, [x, ...series.map(s => s.values)], box);
}

async function refreshCharts(found) {
  const c = await api('charts', {hours: 24});
  if (c.error) return;
  const x = c.hours.map(h => Date.parse(h + ':00:00Z') / 1000);
  chart('chart-flow', 'Messages and deliveries per hour', x, [
    {label: 'messages received', values: c.messages},
    ...c.destinations.map(d => ({label: 'delivered to ' + d, values: c.delivered[d]}))]);
  chart('chart-latency', 'Latency per hour: ACK (ms), delivery (s)', x, [
    {label: 'ACK mean', values: c.ack_mean_ms, scale: 'ms'}, {label: 'ACK max', values: c.ack_max_ms, scale: 'ms'},
    ...c.destinations.map(d => ({label: 'receipt → ' + d + ', mean', values: c.delivery_mean_s[d], scale: 's'}))]);
  chart('chart-outbox', 'Outbox depth (undelivered)', x,
        c.destinations.map(d => ({label: d, values: c.outbox_depth[d]})), {unit: 'deliveries'});
  const facilities = Object.keys(found.kpis);
  const lag = (name, part) => facilities.map(f => (found.kpis[f].lag[name] || {})[part] ?? null);
  chart('chart-lag', 'Charge lag per facility, hours', facilities.map((f, i) => i), [
    {label: 'service → charge p50', values: lag('service_to_charge', 'p50_hours'), color: '#2a8a57'},
    {label: 'service → charge p90', values: lag('service_to_charge', 'p90_hours'), color: '#e67e22'},
  ], {categories: facilities, bars: true, unit: 'hours'});
}

async function refresh() {
  const found = await api('reconcile', filters());
  if (found.error) { put('rc-error', el('p', {id: 'rc-error', class: 'err'}, found.error)); return; }
  put('rc-error', el('p', {id: 'rc-error'}));
  const counts = Object.keys(KINDS).map(k => KINDS[k] + ': ' + found.exceptions.filter(e => e.kind === k).length);
  put('rc-counts', el('p', {id: 'rc-counts', class: 'note'}, counts.join(' · ')));
  put('rc-queue', queue(found.exceptions));
  put('rc-kpis', kpis(found.kpis));
  const facility = document.getElementById('rc-facility');
  const known = new Set([...facility.options].map(o => o.value));
  Object.keys(found.kpis).filter(f => !known.has(f)).forEach(f => facility.append(el('option', {value: f}, f)));
  refreshCharts(found);
}

export default {
  id: 'reconcile', title: 'Scheduling to cash',
  refresh,
  render(main) {
    const operator = session.role === 'operator';
    main.append(
      el('div', {class: 'filters'},
        el('label', {}, 'Window', el('select', {id: 'rc-since', onchange: refresh},
          ['7d', '30d', '90d'].map(v => el('option', {value: v, selected: v === '30d'}, 'last ' + v)))),
        el('label', {}, 'Facility', el('select', {id: 'rc-facility', onchange: refresh}, el('option', {value: ''}, 'all'))),
        el('label', {}, 'Queue', el('select', {id: 'rc-kind', onchange: refresh}, el('option', {value: ''}, 'all'),
          Object.entries(KINDS).map(([k, v]) => el('option', {value: k}, v)))),
        el('label', {}, 'Acknowledged too', el('input', {type: 'checkbox', id: 'rc-acknowledged', onchange: refresh}))),
      operator ? el('div', {class: 'actions'}, el('label', {}, 'Note ', el('input', {type: 'text', id: 'rc-note',
        placeholder: 'what was done (kept with the acknowledgement)'}))) : el('p', {class: 'note'}, 'Acknowledging needs the operator role.'),
      el('p', {id: 'rc-error'}), el('p', {id: 'rc-result'}),
      el('h2', {}, 'Work queues'), el('p', {id: 'rc-counts'}), el('table', {id: 'rc-queue'}), el('div', {id: 'rc-detail'}),
      el('h2', {}, 'KPIs per facility'), el('table', {id: 'rc-kpis'}),
      el('h2', {}, 'Charts'),
      el('div', {class: 'charts'}, ['chart-flow', 'chart-latency', 'chart-outbox', 'chart-lag'].map(
        id => el('div', {class: 'chart', id}))));
    refresh();
  },
};
