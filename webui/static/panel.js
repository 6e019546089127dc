// The panel's live layer: server-sent events keep pages current; actions go
// through the REST API with the session cookie and the page's CSRF token,
// after a confirmation that says how many connections they touch.
"use strict";
const csrf = document.querySelector('meta[name="csrf-token"]')?.content;
const $ = (sel, root = document) => root.querySelector(sel);

function toast(text, bad = false) {
  const t = $('#toast'); if (!t) return;
  t.textContent = text; t.className = 'show' + (bad ? ' bad' : '');
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.className = ''; }, 6000);
}

// an API error's detail as a sentence: a string as it is, validation errors as "field: message"
function detailText(d) {
  if (typeof d === 'string') return d;
  if (Array.isArray(d)) return d.map(e => (e && typeof e === 'object')
    ? ((e.field || (e.loc || []).slice(1).join('.')) ? `${e.field || (e.loc || []).slice(1).join('.')}: ` : '') + (e.msg || 'invalid')
    : String(e)).join('; ');
  return d == null ? '' : String(d);
}

async function call(method, url, body) {
  const r = await fetch(url, { method, credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json', 'Accept': 'application/json', 'X-CSRF-Token': csrf || '' },
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null; try { data = await r.json(); } catch (e) { /* empty or not JSON (a proxy's page) */ }
  if (!r.ok) {
    const msg = detailText(data && data.detail) || r.statusText || 'request failed';
    throw new Error(`${r.status === 403 ? 'Refused' : 'Error'} (${r.status}): ${msg}`);
  }
  return data;
}

function confirmDialog(title, text) {
  const dlg = $('#confirm');
  $('#confirm-title').textContent = title; $('#confirm-text').textContent = text;
  return new Promise(resolve => {
    dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true });
    dlg.showModal();
  });
}

// every event kind the server knows (the page lists them), for the SSE listeners
const KINDS = (document.body.dataset.kinds || 'failover,migration,health,divergence,refusal,fence,reset,admin').split(',');
const plural = (n, w) => `${n} ${w}${n === 1 ? '' : 's'}`;

// --- actions ----------------------------------------------------------------------
async function act(btn) {
  const d = btn.dataset;
  try {
    if (d.action === 'failover') {
      const imp = await call('GET', `/api/v1/services/${encodeURIComponent(d.service)}/failover`);
      const to = imp.targets.length ? imp.targets[0] : '(no target ready)';
      if (!await confirmDialog(`Fail over ${d.service}?`,
          `Moves ${plural(imp.connections, 'connection')} from ${imp.from} to ${to}; new connections go to ${to}.`)) return;
      const ev = await call('POST', `/api/v1/services/${encodeURIComponent(d.service)}/failover`);
      toast(`failover #${ev.id}: ${ev.details.from} → ${ev.backend}, ${plural(ev.details.moved.length, 'connection')} moved`);
    } else if (d.action === 'admin_state') {
      const q = `admin_state=${d.state}&service=${encodeURIComponent(d.service)}`;
      const info = await call('GET', `/api/v1/backends/${encodeURIComponent(d.backend)}?${q}`);
      const imp = info.impact;
      const what = d.state === 'maint' ? `moves ${plural(imp.moved, 'connection')} off it`
        : d.state === 'drain' ? `keeps its ${plural(imp.connections, 'connection')}, takes no new ones`
        : `lets it take new connections (${plural(imp.connections, 'open connection')})`;
      if (!await confirmDialog(`Set ${d.backend} to ${d.state} in ${d.service}?`, `This ${what}.`)) return;
      await call('PUT', `/api/v1/backends/${encodeURIComponent(d.backend)}`, { admin_state: d.state, service: d.service });
      toast(`${d.backend} is now ${d.state}`);
    } else if (d.action === 'migrate') {
      if (!await confirmDialog(`Migrate connection ${d.id}?`, `Moves 1 connection to ${d.to}.`)) return;
      await call('POST', `/api/v1/connections/${d.id}/migrate`, { to: d.to });
      toast(`connection ${d.id} moving to ${d.to}`);
    } else if (d.action === 'reset') {
      if (!await confirmDialog(`Reset connection ${d.id}?`, 'Resets 1 connection on both sides.')) return;
      await call('DELETE', `/api/v1/connections/${d.id}`);
      toast(`connection ${d.id} reset`);
    } else if (d.action === 'revoke') {
      if (!await confirmDialog(`Revoke token ${d.name}?`, 'Requests with it will be refused.')) return;
      await call('DELETE', `/api/v1/tokens/${encodeURIComponent(d.name)}`);
      toast(`token ${d.name} revoked`);
    }
    setTimeout(() => location.reload(), 1200);
  } catch (e) { toast(String(e.message || e), true); }
}
document.addEventListener('click', ev => {
  const btn = ev.target.closest('button.act'); if (btn) { ev.preventDefault(); act(btn); }
});

// --- the banner ----------------------------------------------------------------------
function fmtTime(t) { return t ? new Date(t * 1000).toLocaleString('sv-SE').replace('T', ' ') : ''; }
function banner(st) {
  const set = (id, v) => { const e = document.getElementById(id); if (e) e.textContent = v; };
  set('b-role', st.node.role); set('b-health', st.node.health); set('b-uptime', Math.round(st.uptime_seconds));
  set('b-tracked', st.connections); set('b-protected', st.protected); set('b-moving', st.moving);
  set('b-problems', st.node.problems.join('; '));
  const lf = st.node.last_failover;
  set('b-lf', lf ? `${fmtTime(lf.time)} ${lf.service}: ${lf.from} → ${lf.to} (${lf.reason}), ${lf.moved} moved`
    + (lf.duration_ms === null ? `, ${lf.pending} still moving` : ` in ${lf.duration_ms} ms`) : 'none');
  const b = $('#banner'); if (b) b.className = `banner health-${st.node.health}`;
  if (st.pair) pairBanner(st.pair);
}
// the gateway pair (a node of a pair only): role, epoch, peer, lag, last takeover; a warning while degraded
function pairLag(lag) {
  const b = lag ? lag.bytes : null, ms = lag ? lag.ms : null;
  return (b == null && ms == null) ? 'not measured' : `${b ?? '–'} B, ${ms ?? '–'} ms`;
}
function pairBanner(p) {
  const box = $('#pair-banner'); if (!box) return;
  const set = (id, v) => { const e = document.getElementById(id); if (e) e.textContent = v; };
  set('p-node', p.node); set('p-role', p.role); set('p-epoch', p.epoch); set('p-vrrp', p.vrrp || '–');
  set('p-eligible', p.eligible ? 'yes' : 'no'); set('p-forwarding', p.forwarding ? 'yes' : 'no');
  set('p-peer', p.peer); set('p-lag', pairLag(p.lag));
  const lt = p.last_takeover;
  set('p-takeover', lt ? `${fmtTime(lt.at)} epoch ${lt.epoch}: ${lt.reason}, ${lt.reattached} re-attached, `
    + `${lt.reset} reset in ${lt.duration_ms} ms` : 'none');
  let warn = $('#pair-degraded');
  if (p.degraded) {
    if (!warn) {
      warn = document.createElement('div'); warn.id = 'pair-degraded'; warn.className = 'pair-degraded';
      warn.setAttribute('role', 'alert'); warn.append('pair degraded: ');
      const why = document.createElement('span'); why.id = 'p-degraded'; warn.append(why); box.append(warn);
    }
    set('p-degraded', p.degraded);
  } else if (warn) warn.remove();
  box.className = `banner pair pair-${p.role}` + (p.degraded ? ' pair-bad' : '');
}
if ($('#banner')) {
  const es = new EventSource('/api/v1/status/stream');
  es.addEventListener('status', m => banner(JSON.parse(m.data)));
}

// --- the connections list -----------------------------------------------------------------
function td(text, cls) { const e = document.createElement('td'); e.textContent = text ?? ''; if (cls) e.className = cls; return e; }
const conns = $('table#connections[data-live]');
if (conns) {
  const params = new URLSearchParams(location.search);
  params.set('offset', conns.dataset.offset); params.set('limit', conns.dataset.limit);
  if (params.get('protected') === 'yes') params.set('protected', 'true');
  else if (params.get('protected') === 'no') params.set('protected', 'false');
  else params.delete('protected');
  for (const k of [...params.keys()]) if (params.get(k) === '') params.delete(k);
  const es = new EventSource('/api/v1/connections/stream?' + params);
  es.addEventListener('connections', m => {
    const doc = JSON.parse(m.data);
    const tot = $('#conn-total'); if (tot) tot.textContent = doc.total;
    const range = $('#conn-range');
    if (range) range.textContent = `${doc.total ? doc.offset + 1 : 0}–${Math.min(doc.offset + doc.limit, doc.total)} of ${doc.total}`;
    const body = conns.tBodies[0];
    const known = new Set([...body.rows].map(r => r.dataset.id));
    body.replaceChildren(...doc.connections.map(c => {
      const tr = document.createElement('tr'); tr.dataset.id = c.id;
      if (!known.has(String(c.id))) tr.className = 'new';
      const a = document.createElement('a'); a.href = `/connections/${c.id}`; a.textContent = c.id;
      const first = td(''); first.appendChild(a);
      tr.append(first, td(c.client), td(c.service_name), td(c.backend, 'backend'), td(c.state, 'state-' + c.state),
        td(c.protected ? 'yes' : 'no'), td(c.bytes_from_client, 'num'), td(c.bytes_from_server, 'num'),
        td(c.checkpoint_age, 'num'), td(c.commit_lag ?? '–', 'num'));
      return tr;
    }));
  });
}

// --- one connection: fields and the bytes chart ---------------------------------------------
const chart = $('svg#chart');
if (chart) {
  const id = chart.dataset.id, pts = [];
  const es = new EventSource(`/api/v1/connections/${id}/stream`);
  es.addEventListener('connection', m => {
    const c = JSON.parse(m.data); if (!c) return;
    for (const cell of document.querySelectorAll('#ici td[data-k]')) {
      const v = c[cell.dataset.k]; if (v !== undefined && typeof v !== 'object') cell.textContent = v ?? '';
    }
    $('#c-backend').textContent = c.backend; $('#c-state').textContent = c.state;
    pts.push([Date.now() / 1000, c.bytes_from_server, c.bytes_from_client]);
    if (pts.length > 600) pts.shift();
    const t0 = pts[0][0], span = Math.max(1, pts[pts.length - 1][0] - t0);
    const max = Math.max(1, ...pts.map(p => Math.max(p[1], p[2])));
    const xy = i => pts.map(p => `${(50 + 540 * (p[0] - t0) / span).toFixed(1)},${(190 - 175 * p[i] / max).toFixed(1)}`).join(' ');
    $('#line-server').setAttribute('points', xy(1)); $('#line-client').setAttribute('points', xy(2));
    $('#chart-max').textContent = `${(max / 1048576).toFixed(2)} MiB`; $('#chart-span').textContent = `${span.toFixed(0)} s`;
  });
}

// --- one connection: its timeline, live ----------------------------------------------------------
const timeline = $('table#timeline[data-id]');
if (timeline) {
  const d = timeline.dataset;
  const es = new EventSource(`/api/v1/events/stream?connection=${d.id}&since_id=${d.last}`);
  const add = m => {
    const e = JSON.parse(m.data);
    const tr = document.createElement('tr'); tr.className = 'new';
    tr.append(td(e.id), td(fmtTime(e.time)), td(e.kind, 'kind-' + e.kind), td(e.backend), td(e.reason));
    (timeline.tBodies[0] || timeline).appendChild(tr);
  };
  for (const k of KINDS) es.addEventListener(k, add);
}

// --- the events page ------------------------------------------------------------------------
const evs = $('table#events[data-live]');
if (evs) {
  const d = evs.dataset, p = new URLSearchParams();
  for (const k of ['kind', 'service', 'backend']) if (d[k]) p.set(k, d[k]);
  p.set('since_id', d.last);
  const es = new EventSource('/api/v1/events/stream?' + p);
  const add = m => {
    const e = JSON.parse(m.data);
    if (d.q && !e.reason.toLowerCase().includes(d.q.toLowerCase())) return;
    const tr = document.createElement('tr'); tr.className = 'new';
    const conn = td(''); if (e.connection) { const a = document.createElement('a'); a.href = `/connections/${e.connection}`; a.textContent = e.connection; conn.appendChild(a); }
    tr.append(td(e.id), td(fmtTime(e.time)), td(e.kind, 'kind-' + e.kind), td(e.service), td(e.backend), conn, td(e.reason));
    evs.tBodies[0].prepend(tr);
  };
  for (const k of KINDS) es.addEventListener(k, add);
}

// --- admin: tokens and configuration -----------------------------------------------------------
const newToken = $('#new-token');
if (newToken) newToken.addEventListener('submit', async ev => {
  ev.preventDefault();
  const f = new FormData(newToken);
  try {
    const t = await call('POST', '/api/v1/tokens', { name: f.get('name'), role: f.get('role') });
    const p = $('#new-token-value'); p.hidden = false; $('code', p).textContent = t.token;
    toast(`token ${t.name} (${t.role}) created`);
  } catch (e) { toast(String(e.message || e), true); }
});
const save = $('#config-save');
if (save) save.addEventListener('click', async () => {
  let doc;
  try { doc = JSON.parse($('#config').value); } catch (e) { toast('not valid JSON: ' + e.message, true); return; }
  try {
    const r = await call('PUT', '/api/v1/config', { version: Number($('#config-version').textContent), config: doc });
    $('#config-version').textContent = r.version;
    $('#config-result').textContent = r.changed.length ? 'changed: ' + r.changed.join(', ') : 'no change';
  } catch (e) { $('#config-result').textContent = String(e.message || e); toast(String(e.message || e), true); }
});
