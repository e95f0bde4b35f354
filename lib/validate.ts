/**
 * Option validation helpers. Messages name the option and show what was received, e.g.
 * "Expected an integer 1–255 for cpus but received 0".
 */

/** A TypeError with Node's code `ERR_INVALID_ARG_TYPE`: the option has the wrong kind of value. */
export function typeError(message: string): TypeError & { code: 'ERR_INVALID_ARG_TYPE' } {
  const e = Object.assign(new TypeError(message), { code: 'ERR_INVALID_ARG_TYPE' as const });
  Error.captureStackTrace(e, typeError);
  return e;
}

/** A RangeError with Node's code `ERR_OUT_OF_RANGE`: the right kind of value, but not one allowed. */
export function rangeError(message: string): RangeError & { code: 'ERR_OUT_OF_RANGE' } {
  const e = Object.assign(new RangeError(message), { code: 'ERR_OUT_OF_RANGE' as const });
  Error.captureStackTrace(e, rangeError);
  return e;
}

/** Short, safe rendering of a received value for error messages. */
export function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 80 ? `${value.slice(0, 77)}...` : value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  if (typeof value === 'function') return 'a function';
  return `an object (${Object.prototype.toString.call(value).slice(8, -1)})`;
}

/** An integer in [min, max]. Throws TypeError for non-numbers, RangeError otherwise. */
export function integer(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || Number.isNaN(value)) {
    throw typeError(`Expected an integer ${min}–${max} for ${name} but received ${describe(value)}`);
  }
  if (!Number.isInteger(value) || value < min || value > max) {
    throw rangeError(`Expected an integer ${min}–${max} for ${name} but received ${describe(value)}`);
  }
  return value;
}

/** A string with no NUL byte; non-empty unless `allowEmpty`. */
export function string(name: string, value: unknown, opts: { allowEmpty?: boolean; maxLength?: number } = {}): string {
  if (typeof value !== 'string') {
    throw typeError(`Expected a string for ${name} but received ${describe(value)}`);
  }
  if (!opts.allowEmpty && value.length === 0) {
    throw rangeError(`Expected a non-empty string for ${name} but received ""`);
  }
  if (value.includes('\0')) {
    throw rangeError(`Expected ${name} to contain no NUL character but received ${describe(value)}`);
  }
  if (opts.maxLength !== undefined && Buffer.byteLength(value) > opts.maxLength) {
    throw rangeError(`Expected at most ${opts.maxLength} bytes for ${name} but received ${Buffer.byteLength(value)}`);
  }
  return value;
}

/** An absolute path (string, no NUL, starts with "/"). */
export function absolutePath(name: string, value: unknown): string {
  const s = string(name, value);
  if (!s.startsWith('/')) {
    throw rangeError(`Expected an absolute path for ${name} but received ${describe(s)}`);
  }
  if (Buffer.byteLength(s) >= 4096) {
    throw rangeError(`Expected a path shorter than 4096 bytes for ${name}`);
  }
  return s;
}

/** A boolean. */
export function boolean(name: string, value: unknown): boolean {
  if (typeof value !== 'boolean') {
    throw typeError(`Expected a boolean for ${name} but received ${describe(value)}`);
  }
  return value;
}

/** An array of strings, each validated with {@link string}. */
export function stringArray(name: string, value: unknown, opts: { allowEmptyItems?: boolean } = {}): string[] {
  if (!Array.isArray(value)) {
    throw typeError(`Expected an array of strings for ${name} but received ${describe(value)}`);
  }
  return value.map((item, i) => string(`${name}[${i}]`, item, { allowEmpty: opts.allowEmptyItems }));
}

/** A plain object (not null, not an array). */
export function object(name: string, value: unknown): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw typeError(`Expected an object for ${name} but received ${describe(value)}`);
  }
  return value as Record<string, unknown>;
}

/** Rejects keys of `value` that are not in `allowed` (catches typos such as `memoryMb`). */
export function knownKeys(name: string, value: Record<string, unknown>, allowed: readonly string[]): void {
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) {
      throw typeError(`Unknown option ${name}.${key} (known: ${allowed.join(', ')})`);
    }
  }
}

/** A value of the right type that is not allowed (as Node's own argument checks): `ERR_INVALID_ARG_VALUE`. */
export function valueError(message: string): TypeError & { code: 'ERR_INVALID_ARG_VALUE' } {
  return Object.assign(new TypeError(message), { code: 'ERR_INVALID_ARG_VALUE' as const });
}

/** `KEY=VALUE` environment entries; KEY must be a valid variable name. */
export function envEntries(name: string, value: unknown): string[] {
  const items = stringArray(name, value);
  items.forEach((item, i) => {
    const eq = item.indexOf('=');
    const key = eq < 0 ? '' : item.slice(0, eq);
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) {
      throw rangeError(
        `Expected KEY=VALUE with a valid variable name for ${name}[${i}] but received ${describe(item)}`,
      );
    }
  });
  return items;
}
