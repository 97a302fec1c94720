// Listeners: each MLLP listener with its connected peers (address, since when, messages, last
// message), and the connections closed lately: "is the clinic connected?"
import {api, el, put, table} from '../lib.js';

async function refresh() {
  const found = await api('listeners');
  const box = el('div', {id: 'listener-list'});
  for (const l of found.listeners || []) {
    box.append(
      el('h2', {}, 'Listener ' + l.name),
      el('p', {class: 'note'}, (l.address ? 'on ' + l.address + ' ' : '') + '(' + l.transport + ', ' + l.endpoint + '): ' +
         l.open.length + ' of at most ' + l.max_connections + ' connections open, ' + l.frames + ' frames since start'),
      el('h3', {}, 'Connected'),
      table('open-' + l.name, [['peer', c => c.peer], ['connected since', c => c.since], ['messages', c => c.messages],
                               ['last message', c => c.last_message_at || '']], l.open),
      el('h3', {}, 'Closed lately'),
      table('closed-' + l.name, [['peer', c => c.peer], ['connected', c => c.since], ['closed', c => c.closed_at],
                                 ['messages', c => c.messages], ['last message', c => c.last_message_at || '']],
            l.recently_closed));
  }
  if (found.error) box.append(el('p', {class: 'err'}, found.error));
  put('listener-list', box);
}

export default {
  id: 'listeners', title: 'Listeners', refresh,
  render(main) { main.append(el('div', {id: 'listener-list'})); refresh(); },
};
