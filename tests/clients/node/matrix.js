// node-postgres runner of pgguard's client compatibility matrix (PROTOCOL.md §4).
//
//   node matrix.js '{"host": "127.0.0.1", "port": 6433, "adminPort": 5432, "password": "secret",
//                    "scenarios": ["scram", "multi", ...]}'
//
// `port` is the target (PostgreSQL itself or pgguard); `adminPort` always reaches PostgreSQL
// directly (NOTIFY from another session, committed-row counts, pg_terminate_backend). Prints
// one JSON line per scenario: {"scenario": NAME, "result": {...}}, with only user-visible,
// non-volatile values so that a direct run and a run through pgguard compare equal.
'use strict'

const crypto = require('crypto')
const { Client } = require('pg')
const Cursor = require('pg-cursor')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const { pipeline } = require('stream/promises')
const { Readable, Writable } = require('stream')

const cfg = JSON.parse(process.argv[2])
const REFUSED = 'SELECT pgguard_refuse_me()'

function client(extra = {}, port = cfg.port) {
  return new Client({
    host: cfg.host, port, user: 'app', password: cfg.password, database: 'app',
    connectionTimeoutMillis: 10000, ...extra,
  })
}

async function withClient(extra, fn) {
  const c = client(extra)
  await c.connect()
  try {
    return await fn(c)
  } finally {
    await c.end().catch(() => {})
  }
}

async function admin(sql) {
  const c = client({}, cfg.adminPort)
  await c.connect()
  try {
    return (await c.query(sql)).rows
  } finally {
    await c.end()
  }
}

const state = (e) => `E:${e.code}`
const rowsOf = (r) => r.rows.map((row) => Object.values(row))
async function resetTable() {
  await admin('DROP TABLE IF EXISTS m; CREATE TABLE m (id int PRIMARY KEY, v text)')
}
async function committed() {
  return Number((await admin('SELECT count(*) AS n FROM m'))[0].n)
}

const scenarios = {
  async scram() {
    return withClient({ application_name: 'matrix-node' }, async (c) => {
      const r = await c.query("SELECT current_user, current_setting('application_name')")
      return { row: rowsOf(r) }
    })
  },

  async tls_default() {
    return tls({ ssl: { rejectUnauthorized: false } })
  },
  async tls_channel_binding() {
    return tls({ ssl: { rejectUnauthorized: false }, enableChannelBinding: true })
  },
  async tls_direct() {
    return tls({ ssl: { rejectUnauthorized: false }, sslnegotiation: 'direct' })
  },

  async multi() {
    return withClient({}, async (c) => {
      const rs = await c.query("SELECT 1 AS a; CREATE TEMP TABLE tt (i int); INSERT INTO tt VALUES (1), (2); SELECT 'x' AS b")
      const sets = rs.map((r) => ({ command: r.command, rowCount: r.rowCount, rows: rowsOf(r) }))
      const empty = await c.query('')
      return { sets, empty: { command: empty.command, rows: empty.rows.length } }
    })
  },

  async extended() {
    return withClient({}, async (c) => {
      const unnamed = []
      for (let i = 0; i < 3; i++) unnamed.push(rowsOf(await c.query('SELECT $1::int * 2 AS x', [i])))
      const named = []
      for (let i = 0; i < 3; i++) {
        named.push(rowsOf(await c.query({ name: 'matrix_q', text: 'SELECT $1::text || $2::text', values: ['a', String(i)] })))
      }
      const prepared = rowsOf(await c.query('SELECT name FROM pg_prepared_statements ORDER BY name'))
      return { unnamed, named, prepared }
    })
  },

  async refused() {
    await resetTable()
    const out = {}
    await withClient({}, async (c) => {
      try { await c.query(REFUSED) } catch (e) { out.simple = state(e) }
      try { await c.query('SELECT pgguard_refuse_me() WHERE $1::int > 0', [1]) } catch (e) { out.extended = state(e) }
      await c.query('BEGIN')
      await c.query("INSERT INTO m VALUES (1, 'lost')")
      try { await c.query({ text: REFUSED, name: 'matrix_refused' }) } catch (e) { out.in_tx = state(e) }
      try { await c.query('SELECT 1') } catch (e) { out.in_failed_tx = state(e) }
      out.commit = (await c.query('COMMIT')).command
      out.usable = rowsOf(await c.query('SELECT 5 AS five'))
    })
    out.committed = await committed()
    return out
  },

  async cursor() {
    return withClient({}, async (c) => {
      const cur = c.query(new Cursor('SELECT g FROM generate_series(1, 45) g'))
      const batches = []
      for (;;) {
        const rows = await cur.read(10)
        if (rows.length === 0) break
        batches.push(rows.length)
      }
      await cur.close()
      return { batches, after: rowsOf(await c.query('SELECT 1 AS one')) }
    })
  },

  async copy() {
    await resetTable()
    const out = {}
    await withClient({}, async (c) => {
      const lines = []
      for (let i = 1; i <= 300; i++) lines.push(`${i}\tr${i}\n`)
      const ins = c.query(copyFrom('COPY m (id, v) FROM STDIN'))
      await pipeline(Readable.from(lines), ins)
      out.in = ins.rowCount
      const chunks = []
      await pipeline(c.query(copyTo('COPY (SELECT id, v FROM m ORDER BY id) TO STDOUT')),
        new Writable({ write(chunk, _enc, cb) { chunks.push(chunk); cb() } }))
      out.out_md5 = crypto.createHash('md5').update(Buffer.concat(chunks)).digest('hex')
      try {
        await pipeline(Readable.from(['1000\tok\n', 'bad\tbad\n', '1001\tok\n']),
          c.query(copyFrom('COPY m (id, v) FROM STDIN')))
        out.bad = 'no error'
      } catch (e) { out.bad = state(e) }
      out.after = rowsOf(await c.query('SELECT count(*)::int AS n FROM m'))
    })
    return out
  },

  async tx() {
    await resetTable()
    const out = {}
    await withClient({}, async (c) => {
      await c.query('BEGIN')
      await c.query("INSERT INTO m VALUES (1, 'kept')")
      out.commit = (await c.query('COMMIT')).command
      await c.query('BEGIN')
      await c.query("INSERT INTO m VALUES (2, 'rolled back')")
      out.rollback = (await c.query('ROLLBACK')).command
      await c.query('BEGIN')
      await c.query("INSERT INTO m VALUES (3, 'lost')")
      try { await c.query("INSERT INTO m VALUES (1, 'dup')") } catch (e) { out.dup = state(e) }
      out.commit_after_error = (await c.query('COMMIT')).command
      out.rows = rowsOf(await c.query('SELECT id, v FROM m ORDER BY id'))
    })
    return out
  },

  async notify() {
    const got = []
    await withClient({}, async (c) => {
      let wake = null
      c.on('notification', (n) => { got.push(`${n.channel}:${n.payload}`); if (wake) wake() })
      const waitFor = (k) => new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`only ${got.length} notifications`)), 10000)
        wake = () => { if (got.length >= k) { clearTimeout(t); resolve() } }
        wake()
      })
      await c.query('LISTEN matrix_chan')
      await admin("NOTIFY matrix_chan, 'idle'")
      await waitFor(1)
      await c.query('BEGIN')
      await c.query("NOTIFY matrix_chan, 'own, in tx'")
      await admin("NOTIFY matrix_chan, 'other, while listener in tx'")
      await c.query('COMMIT')
      await waitFor(3)
    })
    return { notifications: got.sort() }
  },

  async fatal() {
    const c = client({ application_name: 'matrix-fatal-node' })
    const errors = []
    c.on('error', (e) => errors.push(`event:${e.code || e.message}`))
    await c.connect()
    await c.query('SELECT 1')
    const killed = await admin("SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE application_name = 'matrix-fatal-node'")
    await new Promise((r) => setTimeout(r, 500))
    let query
    try { await c.query('SELECT 1'); query = 'no error' } catch (e) { query = e.code ? state(e) : 'closed' }
    await c.end().catch(() => {})
    return { killed: killed[0].n, events: errors, query }
  },

  async large() {
    return withClient({}, async (c) => {
      const r = await c.query({ text: "SELECT g, 'row ' || g FROM generate_series(1, 1000000) g", rowMode: 'array' })
      let sum = 0
      for (const row of r.rows) sum += row[0]
      const blob = Buffer.alloc(50 * 1024 * 1024)
      for (let i = 0; i < blob.length; i++) blob[i] = i & 0xff
      const b = await c.query('SELECT length(b) AS n, md5(b) AS h FROM (SELECT $1::bytea AS b) s', [blob])
      const md5 = crypto.createHash('md5').update(blob).digest('hex')
      const q = await c.query(`SELECT length('${'x'.repeat(20 * 1024 * 1024)}') AS n`)
      return { rows: [r.rows.length, sum], bind: [b.rows[0].n, b.rows[0].h === md5], query: q.rows[0].n }
    })
  },
}

async function tls(extra) {
  const start = Date.now()
  const out = {}
  try {
    await withClient(extra, async (c) => {
      out.row = rowsOf(await c.query('SELECT 40 + 2 AS x'))
      out.ssl = Boolean(c.connection.stream.encrypted)
    })
  } catch (e) {
    out.error = e.code ? state(e) : e.message
  }
  out.seconds = (Date.now() - start) / 1000
  return out
}

async function main() {
  for (const name of cfg.scenarios) {
    let result
    try {
      result = await scenarios[name]()
    } catch (e) {
      result = { crash: `${e.code || ''} ${e.stack || e}` }
    }
    process.stdout.write(JSON.stringify({ scenario: name, result }) + '\n')
  }
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1) })
