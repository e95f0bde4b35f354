/**
 * Keeping Node's event loop alive while a promise the library handed out waits on a VM.
 *
 * Node exits when nothing it counts is pending, whatever promises are still unsettled. Much of
 * what a VM wait rests on does not count on purpose: a detached VMM process, an agent channel
 * between uses, a watcher. So every promise that waits on a VM — run() to the end, `exec`,
 * `wait()`, copies, stop — holds one ref'd handle while it is pending and lets it go when it
 * settles: a script whose last line is `await run(...)` ends with run()'s outcome, never with exit
 * status 0 while it is still pending.
 *
 * A {@link KeepAlive} counts the pending waits of one owner (a VM); `unref()` lets the process exit
 * while they are pending (as `child.unref()` does for a child process).
 */

/** The one handle a holder keeps while it has pending waits: an interval that never fires in practice. */
const FOREVER_MS = 2 ** 31 - 1;

export class KeepAlive {
  #pending = 0;
  #refed = true;
  #timer: NodeJS.Timeout | undefined;

  /** Returns a promise that settles as `p` does and keeps the event loop alive until then. */
  hold<T>(p: Promise<T>): Promise<T> {
    this.#pending++;
    this.#sync();
    return p.finally(() => {
      this.#pending--;
      this.#sync();
    });
  }

  /** Pending waits keep the process alive (the default). */
  ref(): void {
    this.#refed = true;
    this.#sync();
  }

  /** Pending waits no longer keep the process alive. */
  unref(): void {
    this.#refed = false;
    this.#sync();
  }

  /** How many holds are pending (for tests). */
  get pending(): number {
    return this.#pending;
  }

  /** Whether the holder currently keeps the event loop alive. */
  get holding(): boolean {
    return this.#timer !== undefined;
  }

  #sync(): void {
    const want = this.#pending > 0 && this.#refed;
    if (want && !this.#timer) this.#timer = setInterval(() => undefined, FOREVER_MS);
    else if (!want && this.#timer) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }
}

/** The holder for waits that belong to no VM yet (run() itself). */
const global = new KeepAlive();

/** Keeps the event loop alive until `p` settles. */
export function keepAlive<T>(p: Promise<T>): Promise<T> {
  return global.hold(p);
}
