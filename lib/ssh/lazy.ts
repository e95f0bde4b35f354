/**
 * ssh2, loaded on first use: it is a third of what `require('node-microvm')` would otherwise
 * load (~40 ms of module loading here), and most processes (a pull, `microvm ps`) never use SSH.
 */
let cached: typeof import('ssh2') | undefined;

export function ssh2(): typeof import('ssh2') {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  cached ??= require('ssh2') as typeof import('ssh2');
  return cached;
}
