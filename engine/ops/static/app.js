// The dashboard's shell: one page at a time, chosen by the URL's #fragment (#overview,
// #messages, #message/42, ...), a navigation bar, and a refresh every few seconds for the
// pages that show live figures.
//
// Adding a page: a module in pages/ exporting {id, title, render(main, argument), refresh?,
// nav?} and its name in PAGES below; its API calls in engine/ops/dashapi.py.
import {api, el, session} from './lib.js';
import overview from './pages/overview.js';
import messages from './pages/messages.js';
import message from './pages/message.js';
import exceptions from './pages/exceptions.js';
import listeners from './pages/listeners.js';
import reconcile from './pages/reconcile.js';

const PAGES = [overview, messages, exceptions, reconcile, listeners, message];
const REFRESH_MS = 5000;
let current = null;

function show() {
  const [id, argument] = (location.hash.slice(1) || 'overview').split('/');
  const page = PAGES.find(p => p.id === id) || overview;
  current = page;
  document.querySelectorAll('#nav a').forEach(a => a.classList.toggle('current', a.dataset.page === page.id));
  const main = document.getElementById('page');
  main.replaceChildren();
  document.title = 'hl7bridge: ' + page.title;
  page.render(main, argument);
}

async function start() {
  const who = await api('options');
  session.user = who.user; session.role = who.role; session.options = who;
  document.getElementById('who').textContent = 'signed in as ' + who.user + (who.role === 'viewer' ? ' (viewer)' : '');
  document.getElementById('nav').replaceChildren(...PAGES.filter(p => p.nav !== false).map(
    p => el('a', {href: '#' + p.id, id: 'nav-' + p.id, dataset: {page: p.id}}, p.title)));
  window.addEventListener('hashchange', show);
  show();
  setInterval(() => { if (current && current.refresh && !document.hidden) current.refresh(); }, REFRESH_MS);
}

start();
