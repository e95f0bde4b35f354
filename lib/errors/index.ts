/**
 * Error types. Every error this package throws on purpose carries a stable `code`
 * (`ERR_MICROVM_*` for our own conditions, an errno name such as `EINVAL` for libkrun failures)
 * and, where one exists, the original error as `cause`.
 */

import type { ErrnoCode, MicrovmErrorCode } from './codes';

export type { ArgumentErrorCode, ErrnoCode, MicrovmErrorCode } from './codes';

/** Base class of the package's coded errors. */
export class MicrovmError extends Error {
  /**
   * Stable machine-readable code, e.g. `ERR_MICROVM_LIBKRUNFW_NOT_FOUND` (every one is listed in
   * `ERROR_CODES` and docs/api.md), or an errno name on a {@link KrunError}.
   */
  readonly code: MicrovmErrorCode | ErrnoCode;

  constructor(code: MicrovmErrorCode | ErrnoCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MicrovmError';
    this.code = code;
  }
}

/**
 * A libkrun call returned a negative errno. `code` is the errno name (`EINVAL`), `errno` the
 * negative number libkrun returned (Node's convention for system errors), and `syscall` the
 * libkrun function that failed (`krun_set_vm_config`).
 */
export class KrunError extends MicrovmError {
  readonly errno: number;
  readonly syscall: string;

  constructor(code: ErrnoCode, errno: number, syscall: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
    this.name = 'KrunError';
    this.errno = errno;
    this.syscall = syscall;
  }
}

/** Shape of the errors the addon throws (plain Error with extra fields). */
interface NativeErrorFields {
  code?: unknown;
  errno?: unknown;
  syscall?: unknown;
}

/**
 * Re-throws a native error as a typed error created here, so its stack shows the caller's frames.
 * libkrun failures (`syscall` set) become {@link KrunError}; other coded native errors become
 * {@link MicrovmError}; anything else is returned unchanged.
 */
export function fromNativeError(err: unknown): unknown {
  // No `instanceof Error`: errors created by the addon may come from another realm (vm contexts).
  if (typeof err !== 'object' || err === null || typeof (err as { message?: unknown }).message !== 'string') return err;
  const e = err as Error & NativeErrorFields;
  if (typeof e.syscall === 'string' && typeof e.errno === 'number' && typeof e.code === 'string') {
    return new KrunError(e.code as ErrnoCode, e.errno, e.syscall, e.message, { cause: err });
  }
  if (typeof e.code === 'string' && e.code.startsWith('ERR_MICROVM_')) {
    return new MicrovmError(e.code as MicrovmErrorCode, e.message, { cause: err });
  }
  return err;
}

/** Runs `fn`, converting native errors with {@link fromNativeError}. */
export function callNative<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw fromNativeError(err);
  }
}

/** Awaits `promise`, converting native errors with {@link fromNativeError}. */
export async function awaitNative<T>(promise: Promise<T>): Promise<T> {
  try {
    return await promise;
  } catch (err) {
    throw fromNativeError(err);
  }
}

const NO_SPACE_CODES = new Set(['ENOSPC', 'EDQUOT', 'EFBIG']);

/** The errno code of `err` or of an error in its `cause` chain, if it says the disk is full. */
function noSpaceCode(err: unknown): string | undefined {
  for (
    let e = err as { code?: unknown; cause?: unknown } | undefined, depth = 0;
    e && depth < 5;
    e = e.cause as typeof e, depth++
  ) {
    if (typeof e.code === 'string' && NO_SPACE_CODES.has(e.code)) return e.code;
  }
  return undefined;
}

/**
 * `err` as ERR_MICROVM_NO_SPACE when it (or its cause) is ENOSPC, EDQUOT or EFBIG: `what` says
 * which write failed; the original is the cause. Anything else is returned unchanged.
 */
export function asNoSpace(err: unknown, what: string): unknown {
  const code = noSpaceCode(err);
  if (!code || (err as { code?: unknown }).code === 'ERR_MICROVM_NO_SPACE') return err;
  return new MicrovmError(
    'ERR_MICROVM_NO_SPACE',
    `${what}: the disk is full or over quota (${code}): free space or use another --data-dir / dataDir`,
    { cause: err },
  );
}
