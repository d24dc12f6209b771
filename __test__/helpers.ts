// Shared test helpers: temp socket paths and the Rust example worker as a child process.
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'

export const ROOT = resolve(__dirname, '..')

/** The worker binary `npm test` builds; override with FERRY_WORKER_BIN. */
export function workerBin(): string {
  if (process.env.FERRY_WORKER_BIN) return process.env.FERRY_WORKER_BIN
  for (const profile of ['release', 'debug']) {
    const p = join(ROOT, 'target', profile, 'examples', 'worker')
    if (existsSync(p)) return p
  }
  throw new Error('worker binary not found: run `npm run build:worker` first')
}

/** A fresh directory for sockets, removed by the returned cleanup. */
export function tempDir(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-test-'))
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) }
}

export interface Worker {
  socket: string
  child: ChildProcess
  stderr: () => string
  /** Sends SIGTERM and resolves with the exit code once the worker exited. */
  stop: () => Promise<number | null>
}

/**
 * Starts the example worker on a fresh socket and waits for its `ready <path>` line. `args`
 * go after the socket path (like `--busy-poll-us 50`).
 */
export async function startWorker(args: string[] = []): Promise<Worker> {
  const { dir, cleanup } = tempDir()
  const socket = join(dir, 'worker.sock')
  const child = spawn(workerBin(), [socket, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  let err = ''
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d))
  const exited = new Promise<number | null>((res) => child.once('exit', (code) => res(code)))
  await new Promise<void>((res, rej) => {
    const lines = createInterface({ input: child.stdout! })
    lines.on('line', (line) => {
      if (line === `ready ${socket}`) res()
    })
    child.once('exit', (code) => rej(new Error(`worker exited with ${code} before ready: ${err}`)))
    child.once('error', rej)
  })
  return {
    socket,
    child,
    stderr: () => err,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
      const code = await exited
      cleanup()
      return code
    },
  }
}
