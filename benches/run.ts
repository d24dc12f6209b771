// The benchmark orchestrator: `npm run bench` (full) or `npm run bench -- --quick`.
//
// Runs every peer's server and client (benches/README.md has the contract) for every scenario,
// in two placements (client and server pinned to one core; unpinned), and writes
// benches/results/latest.{json,md}, benches/results/chart.svg and the results section of
// docs/benchmarks.md. Figures are reported as ratios against Ferry measured in the same run.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { cpus, release, tmpdir, totalmem } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'

const ROOT = resolve(__dirname, '..')
const RESULTS = join(ROOT, 'benches', 'results')
const quick = process.argv.includes('--quick')
const only = process.argv.find((a) => a.startsWith('--only='))?.slice('--only='.length).split(',')

type Cmd = string[]
const node = (file: string, ...args: string[]): Cmd => [process.execPath, join(ROOT, 'benches', 'peers', file), ...args]
const rust = (bin: string, ...args: string[]): Cmd => [join(ROOT, 'target', 'release', bin), ...args]
const worker: Cmd = [join(ROOT, 'target', 'release', 'examples', 'worker')]
/** The opt-in busy-polling (`busyPollMicros`, `ConnectionConfig::busy_poll`), in µs. */
const BUSY_US = '50'
const busyWorker: Cmd = [...worker, '--busy-poll-us', BUSY_US]

interface Peer {
  id: string
  label: string
  /** The server command (the socket path is appended), or null for self-contained clients. */
  server: Cmd | null
  client: Cmd
  /** Run in quick mode too. */
  quick?: boolean
  /** A peer the targets compare: in full mode each scenario runs three times, median kept. */
  key?: boolean
}

const PEERS: Peer[] = [
  { key: true, id: 'ferry', label: 'Ferry: Node → Rust', server: worker, client: node('ferry.cjs'), quick: true },
  { key: true, id: 'ferry-rust-js', label: 'Ferry: Rust → JS handler', server: node('ferry-server.cjs'), client: rust('ferry-client'), quick: true },
  { key: true, id: 'ferry-rust', label: 'ferry-core: Rust → Rust', server: worker, client: rust('ferry-client'), quick: true },
  { key: true, id: 'floor-std', label: 'floor: raw Rust std', server: rust('floor-server', 'std'), client: rust('floor-client', 'std'), quick: true },
  { id: 'floor-tokio', label: 'floor: raw Rust tokio', server: rust('floor-server', 'tokio'), client: rust('floor-client', 'tokio'), quick: true },
  // The std floor's server, called the way ferry-client calls: a tokio task per call in flight.
  { key: true, id: 'floor-tasks', label: 'floor: Rust tokio, a task per call', server: rust('floor-server', 'std'), client: rust('floor-tasks'), quick: true },
  // Node over the same raw echo server, with no protocol at all: the floor of any Node client.
  { key: true, id: 'floor-node', label: 'floor: Node net, no protocol', server: rust('floor-server', 'std'), client: node('floor-node.cjs'), quick: true },
  { key: true, id: 'net-msgpackr', label: 'Node net + msgpackr (corked) → Rust', server: worker, client: node('net-msgpackr.cjs'), quick: true },
  // Opt-in busy-polling on both ends, against the pure-JS client to the same busy-polling worker.
  { id: 'ferry-busy', label: `Ferry: Node → Rust, both busy-poll ${BUSY_US} µs (opt-in)`, server: busyWorker, client: node('ferry.cjs', '--busy-poll-us', BUSY_US) },
  { id: 'net-msgpackr-busy', label: `Node net + msgpackr → Rust, worker busy-polls ${BUSY_US} µs`, server: busyWorker, client: node('net-msgpackr.cjs') },
  { id: 'net-json', label: 'Node net + JSON, both ends', server: node('net-json-server.cjs'), client: node('net-json.cjs') },
  { id: 'node-ipc', label: 'node-ipc 14', server: node('node-ipc-server.cjs'), client: node('node-ipc.cjs') },
  { id: 'undici-axum', label: 'undici (HTTP keep-alive) → Rust axum', server: rust('axum-server'), client: node('undici.cjs') },
  { id: 'grpc', label: '@grpc/grpc-js over unix:', server: node('grpc-server.cjs'), client: node('grpc.cjs') },
  { id: 'child-ipc', label: 'child_process IPC', server: null, client: node('child-ipc.cjs') },
]

interface Scenario {
  id: string
  label: string
  args: string[]
  metric: string
  unit: string
  /** true when a larger value is better. */
  higher: boolean
}

const dur = quick ? '400' : '3000'
const warm = quick ? '200' : '1000'
const SCENARIOS: Scenario[] = [
  { id: 'p50', label: 'latency p50', args: ['--scenario', 'latency', '--n', quick ? '3000' : '20000', '--warmup', quick ? '500' : '2000'], metric: 'p50_us', unit: 'µs', higher: false },
  { id: 'tput64', label: 'calls/s, 64 in flight', args: ['--scenario', 'throughput', '--inflight', '64', '--duration-ms', dur, '--warmup-ms', warm], metric: 'calls_per_s', unit: '/s', higher: true },
  { id: 'tput1024', label: 'calls/s, 1,024 in flight', args: ['--scenario', 'throughput', '--inflight', '1024', '--duration-ms', dur, '--warmup-ms', warm], metric: 'calls_per_s', unit: '/s', higher: true },
  { id: 'echo64k', label: '64 KiB echo', args: ['--scenario', 'echo', '--size', '65536', '--inflight', '4', '--duration-ms', dur, '--warmup-ms', warm], metric: 'mb_per_s', unit: 'MB/s', higher: true },
  { id: 'echo1m', label: '1 MiB echo', args: ['--scenario', 'echo', '--size', '1048576', '--inflight', '2', '--duration-ms', dur, '--warmup-ms', warm], metric: 'mb_per_s', unit: 'MB/s', higher: true },
  { id: 'first', label: 'connect to first answer', args: ['--scenario', 'first'], metric: 'first_ms', unit: 'ms', higher: false },
  { id: 'memory', label: 'RSS, 10,000 pending', args: ['--scenario', 'memory', '--pending', '10000'], metric: 'rss_mb', unit: 'MiB', higher: false },
]
// The latency percentile reported next to p50.
const P99 = 'p99_us'

const PLACEMENTS = quick ? ['pinned'] : ['pinned', 'unpinned']
const pin = (placement: string, cmd: Cmd): Cmd => (placement === 'pinned' ? ['taskset', '-c', '0', ...cmd] : cmd)

function startServer(cmd: Cmd, socket: string): Promise<ChildProcess> {
  return new Promise((res, rej) => {
    const child = spawn(cmd[0], [...cmd.slice(1), socket], { stdio: ['ignore', 'pipe', 'inherit'] })
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      rej(new Error(`server ${cmd.join(' ')} not ready in 30 s`))
    }, 30_000)
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (line.startsWith('ready')) {
        clearTimeout(timer)
        res(child)
      }
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      rej(new Error(`server ${cmd.join(' ')} exited with ${code} before ready`))
    })
  })
}

async function stopServer(child: ChildProcess) {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise((r) => child.once('exit', r))
  child.kill('SIGTERM')
  const t = setTimeout(() => child.kill('SIGKILL'), 5000)
  await exited
  clearTimeout(t)
}

function runClient(cmd: Cmd, args: string[], timeoutMs: number): Promise<Record<string, number | string>> {
  return new Promise((res) => {
    const child = spawn(cmd[0], [...cmd.slice(1), ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout!.on('data', (d) => (out += d))
    child.stderr!.on('data', (d) => (err += d))
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.once('exit', (code, signal) => {
      clearTimeout(timer)
      const line = out.trim().split('\n').pop() ?? ''
      try {
        if (code !== 0) throw new Error()
        res(JSON.parse(line))
      } catch {
        const why = signal === 'SIGKILL' ? 'timed out' : `exit ${code ?? signal}: ${err.trim().split('\n').pop() ?? ''}`
        res({ error: why.slice(0, 200) })
      }
    })
  })
}

type Results = Record<string, Record<string, Record<string, Record<string, number | string>>>>

async function main() {
  const missing = PEERS.flatMap((p) => [p.server, p.client])
    .filter((c): c is Cmd => c !== null)
    .map((c) => c[0])
    .filter((f) => f.startsWith(ROOT) && !existsSync(f))
  if (missing.length) {
    console.error(`missing binaries (run \`npm run build:bench\`): ${[...new Set(missing)].join(', ')}`)
    process.exit(1)
  }
  const peers = PEERS.filter((p) => (only ? only.includes(p.id) : !quick || p.quick))
  const dir = mkdtempSync(join(tmpdir(), 'ferry-bench-'))
  const results: Results = {}
  const started = Date.now()
  try {
    for (const placement of PLACEMENTS) {
      results[placement] = {}
      for (const peer of peers) results[placement][peer.id] = {}
      for (const sc of SCENARIOS) {
        // The key peers' three runs of a scenario are interleaved (round 1: every peer, round
        // 2: the key peers again, ...), so the ratios between them compare runs made minutes
        // apart at most, not a quarter of an hour: the load of this shared machine drifts.
        const runs = new Map<string, Record<string, number | string>[]>(peers.map((p) => [p.id, []]))
        const repeats = (peer: Peer) => (!quick && peer.key && sc.id !== 'memory' ? 3 : 1)
        for (let round = 0; round < 3; round++) {
          for (const peer of peers) {
            if (round >= repeats(peer)) continue
            const socket = join(dir, `${peer.id}.sock`)
            // A fresh server for every run: no state (JIT, buffers, held calls) carries over.
            let server: ChildProcess | null = null
            try {
              if (peer.server) server = await startServer(pin(placement, peer.server), socket)
              runs.get(peer.id)!.push(await runClient(pin(placement, peer.client), ['--socket', socket, ...sc.args], quick ? 30_000 : 120_000))
            } catch (e) {
              runs.get(peer.id)!.push({ error: String((e as Error).message).slice(0, 200) })
            } finally {
              if (server) await stopServer(server)
            }
          }
        }
        for (const peer of peers) {
          const r = median(runs.get(peer.id)!, sc.metric)
          results[placement][peer.id][sc.id] = r
          const shown = r[sc.metric] ?? r.skipped ?? r.error
          console.error(`${placement.padEnd(8)} ${peer.id.padEnd(14)} ${sc.id.padEnd(9)} ${typeof shown === 'number' ? fmt(shown) : shown}`)
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }

  const machine = machineNotes()
  const report = {
    date: new Date().toISOString(),
    quick,
    seconds: Math.round((Date.now() - started) / 1000),
    machine,
    peers: peers.map(({ id, label }) => ({ id, label })),
    scenarios: SCENARIOS.map(({ id, label, metric, unit, higher }) => ({ id, label, metric, unit, higher })),
    results,
  }
  mkdirSync(RESULTS, { recursive: true })
  const suffix = quick ? '-quick' : ''
  writeFileSync(join(RESULTS, `latest${suffix}.json`), JSON.stringify(report, null, 2) + '\n')
  const md = markdown(report, peers)
  writeFileSync(join(RESULTS, `latest${suffix}.md`), md)
  writeFileSync(join(RESULTS, `chart${suffix}.svg`), chart(report, peers))
  if (!quick && !only) updateDocs(md)
  console.log(md)
}

/** The run with the median value of `metric` (runs without it count as worst). */
function median(runs: Record<string, number | string>[], metric: string): Record<string, number | string> {
  if (runs.length === 1) return runs[0]
  const ok = runs.filter((r) => typeof r[metric] === 'number').sort((a, b) => (a[metric] as number) - (b[metric] as number))
  if (ok.length === 0) return runs[0]
  return { ...ok[Math.floor((ok.length - 1) / 2)], runs: runs.length }
}

function fmt(v: number): string {
  if (v >= 100_000) return `${(v / 1000).toFixed(0)}k`
  if (v >= 10_000) return `${(v / 1000).toFixed(1)}k`
  if (v >= 100) return v.toFixed(0)
  if (v >= 10) return v.toFixed(1)
  return v.toFixed(2)
}

function value(r: Record<string, number | string> | undefined, metric: string): number | null {
  const v = r?.[metric]
  return typeof v === 'number' ? v : null
}

function machineNotes() {
  const sh = (cmd: string, args: string[]) => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8' }).trim()
    } catch {
      return 'unknown'
    }
  }
  return {
    cpu: cpus()[0]?.model ?? 'unknown',
    cores: cpus().length,
    memory_gib: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    node: process.version,
    rustc: sh('rustc', ['--version']),
  }
}

type Report = {
  date: string
  quick: boolean
  seconds: number
  machine: ReturnType<typeof machineNotes>
  results: Results
}

/** The issue's targets, as checks against this run's figures. */
function targets(results: Results) {
  const get = (placement: string, peer: string, sc: string, metric: string) => value(results[placement]?.[peer]?.[sc], metric)
  const checks: { placement: string; what: string; ratio: number | null; goal: string; ok: boolean | null }[] = []
  for (const placement of Object.keys(results)) {
    const ratio = (a: number | null, b: number | null) => (a !== null && b !== null && b > 0 ? a / b : null)
    const add = (what: string, r: number | null, goal: string, ok: ((r: number) => boolean) | null) =>
      checks.push({ placement, what, ratio: r, goal, ok: r === null || ok === null ? null : ok(r) })
    add('p50 latency, Ferry / net+msgpackr', ratio(get(placement, 'ferry', 'p50', 'p50_us'), get(placement, 'net-msgpackr', 'p50', 'p50_us')), '≤ 0.75', (r) => r <= 0.75)
    for (const sc of ['tput64', 'tput1024']) {
      add(`calls/s (${sc === 'tput64' ? 64 : 1024} in flight), Ferry / net+msgpackr`, ratio(get(placement, 'ferry', sc, 'calls_per_s'), get(placement, 'net-msgpackr', sc, 'calls_per_s')), '≥ 2', (r) => r >= 2)
    }
    add('64 KiB echo, Ferry / net+msgpackr', ratio(get(placement, 'ferry', 'echo64k', 'mb_per_s'), get(placement, 'net-msgpackr', 'echo64k', 'mb_per_s')), '≥ 3', (r) => r >= 3)
    add('64 KiB echo, Ferry / raw std floor', ratio(get(placement, 'ferry', 'echo64k', 'mb_per_s'), get(placement, 'floor-std', 'echo64k', 'mb_per_s')), '≥ 0.5', (r) => r >= 0.5)
    add('context: 64 KiB echo, Node floor / raw std floor', ratio(get(placement, 'floor-node', 'echo64k', 'mb_per_s'), get(placement, 'floor-std', 'echo64k', 'mb_per_s')), '—', null)
    add('context: 64 KiB echo, Ferry / Node floor', ratio(get(placement, 'ferry', 'echo64k', 'mb_per_s'), get(placement, 'floor-node', 'echo64k', 'mb_per_s')), '—', null)
    add('p50 latency, ferry-core Rust→Rust / raw std floor', ratio(get(placement, 'ferry-rust', 'p50', 'p50_us'), get(placement, 'floor-std', 'p50', 'p50_us')), '≤ 1.5', (r) => r <= 1.5)
    add('calls/s (64), ferry-core Rust→Rust / raw std floor', ratio(get(placement, 'ferry-rust', 'tput64', 'calls_per_s'), get(placement, 'floor-std', 'tput64', 'calls_per_s')), '≥ 0.5', (r) => r >= 0.5)
    // Not a target: how close a client whose calls are tasks can come to the std floor at all.
    add('context: calls/s (64), floor with a task per call / raw std floor', ratio(get(placement, 'floor-tasks', 'tput64', 'calls_per_s'), get(placement, 'floor-std', 'tput64', 'calls_per_s')), '—', null)
    add('p50 latency, Rust→JS / Node→Rust', ratio(get(placement, 'ferry-rust-js', 'p50', 'p50_us'), get(placement, 'ferry', 'p50', 'p50_us')), '≤ 1.5', (r) => r <= 1.5)
    // Not the defaults: the opt-in busy-polling, against net + msgpackr to the same worker.
    add('busy-poll (opt-in): p50 latency, Ferry / net+msgpackr', ratio(get(placement, 'ferry-busy', 'p50', 'p50_us'), get(placement, 'net-msgpackr-busy', 'p50', 'p50_us')), '≤ 0.75', (r) => r <= 0.75)
    add('busy-poll (opt-in): calls/s (64 in flight), Ferry / net+msgpackr', ratio(get(placement, 'ferry-busy', 'tput64', 'calls_per_s'), get(placement, 'net-msgpackr-busy', 'tput64', 'calls_per_s')), '≥ 2', (r) => r >= 2)
  }
  return checks
}

function markdown(report: Report, peers: Peer[]): string {
  const lines: string[] = []
  const m = report.machine
  lines.push(`Run ${report.date.slice(0, 16).replace('T', ' ')} UTC${report.quick ? ' (quick)' : ''}, ${report.seconds} s: ${m.cpu}, ${m.cores} cores, ${m.memory_gib} GiB, Linux ${m.kernel}, Node ${m.node}, ${m.rustc}.`)
  lines.push('')
  lines.push('Each cell: the figure, then its ratio to Ferry (Node → Rust) in the same placement (for latency and memory, lower is better; for calls/s and MB/s, higher is better).')
  for (const placement of Object.keys(report.results)) {
    lines.push('')
    lines.push(`### ${placement === 'pinned' ? 'Pinned: client and server on one core' : 'Unpinned'}`)
    lines.push('')
    lines.push(`| peer | ${SCENARIOS.map((s) => `${s.label} (${s.unit})`).join(' | ')} | p99 (µs) |`)
    lines.push(`| --- | ${SCENARIOS.map(() => '---:').join(' | ')} | ---: |`)
    const base = report.results[placement]['ferry'] ?? {}
    for (const peer of peers) {
      const row = report.results[placement][peer.id] ?? {}
      const cells = SCENARIOS.map((s) => {
        const r = row[s.id]
        const v = value(r, s.metric)
        if (v === null) return r?.skipped ? '—' : r?.error ? 'error' : '—'
        const b = value(base[s.id], s.metric)
        const ratio = b && peer.id !== 'ferry' ? ` (${(v / b).toFixed(2)}×)` : ''
        return `${fmt(v)}${ratio}`
      })
      const p99 = value(row['p50'], P99)
      lines.push(`| ${peer.label} | ${cells.join(' | ')} | ${p99 === null ? '—' : fmt(p99)} |`)
    }
  }
  lines.push('')
  lines.push('### Targets')
  lines.push('')
  lines.push('| placement | ratio | goal | this run | met |')
  lines.push('| --- | --- | --- | ---: | :---: |')
  for (const c of targets(report.results)) {
    lines.push(`| ${c.placement} | ${c.what} | ${c.goal} | ${c.ratio === null ? '—' : c.ratio.toFixed(2)} | ${c.ok === null ? '—' : c.ok ? 'yes' : 'no'} |`)
  }
  return lines.join('\n') + '\n'
}

/** A horizontal bar chart (SVG) of the key figures, pinned placement, as ratios to Ferry. */
function chart(report: Report, peers: Peer[]): string {
  const placement = 'pinned'
  const shown = SCENARIOS.filter((s) => ['p50', 'tput64', 'tput1024', 'echo64k'].includes(s.id))
  const rows = peers.filter((p) => report.results[placement]?.[p.id])
  const barH = 14
  const groupH = rows.length * barH + 34
  const width = 760
  const left = 250
  const plotW = width - left - 90
  const height = shown.length * groupH + 40
  const colors: Record<string, string> = { ferry: '#1f6feb', 'ferry-rust-js': '#388bfd', 'ferry-rust': '#79c0ff' }
  const out: string[] = []
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11">`)
  out.push(`<rect width="100%" height="100%" fill="white"/>`)
  out.push(`<text x="10" y="20" font-size="14" font-weight="bold">Ferry vs. the alternatives (pinned to one core; bars: relative performance, log scale, longest is best)</text>`)
  shown.forEach((s, gi) => {
    const y0 = 40 + gi * groupH
    out.push(`<text x="10" y="${y0 + 12}" font-weight="bold">${s.label} (${s.unit}, ${s.higher ? 'higher' : 'lower'} is better)</text>`)
    const vals = rows.map((p) => value(report.results[placement][p.id]?.[s.id], s.metric))
    const max = Math.max(...vals.filter((v): v is number => v !== null), 1e-9)
    rows.forEach((p, i) => {
      const v = vals[i]
      const y = y0 + 20 + i * barH
      out.push(`<text x="${left - 6}" y="${y + 10}" text-anchor="end">${escapeXml(p.label)}</text>`)
      if (v === null) return
      // Log scale so that 4,600 and 1,400,000 calls/s are both readable.
      const norm = s.higher ? v / max : Math.min(...vals.filter((x): x is number => x !== null)) / v
      const w = Math.max(2, plotW * (1 + Math.log10(Math.max(norm, 1e-3)) / 3))
      out.push(`<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barH - 3}" fill="${colors[p.id] ?? '#8b949e'}"/>`)
      out.push(`<text x="${left + w + 4}" y="${y + 10}">${fmt(v)}</text>`)
    })
  })
  out.push('</svg>')
  return out.join('\n') + '\n'
}

function escapeXml(s: string) {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
}

/** Replaces the generated part of docs/benchmarks.md, keeping the hand-written analysis. */
function updateDocs(md: string) {
  const file = join(ROOT, 'docs', 'benchmarks.md')
  if (!existsSync(file)) return
  const text = readFileSync(file, 'utf8')
  const start = '<!-- results:start -->'
  const end = '<!-- results:end -->'
  const a = text.indexOf(start)
  const b = text.indexOf(end)
  if (a < 0 || b < a) return
  writeFileSync(file, text.slice(0, a + start.length) + '\n' + md + text.slice(b))
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
