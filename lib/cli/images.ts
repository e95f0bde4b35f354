/** The image cache's commands: `pull`, `images`, `cache gc|purge`, `prune`. */

import { gc, list, purge } from '../image/cache';
import { pull } from '../image/pull';
import { sweepVms } from '../state';
import { type CommandContext, untilInterrupted, UsageError, table, signalNumber } from './common';

/** `microvm pull IMAGE`: progress on stderr, the digest on stdout. */
export async function cmdPull(c: CommandContext): Promise<number> {
  const { positional, cacheDir, json, out } = c;
  if (positional.length !== 1) throw new UsageError('pull takes one IMAGE');
  const tty = process.stderr.isTTY && !json;
  const doneLayers = new Set<number>();
  // Ctrl-C / SIGTERM: the pull stops (nothing half-stored) and we exit 128+N.
  const pulled = await untilInterrupted((signal) =>
    pull(positional[0], {
      cacheDir,
      signal,
      onProgress: (p) => {
        const pct = p.total > 0 ? Math.min(100, Math.floor((p.bytes / p.total) * 100)) : 0;
        const bar = `${'#'.repeat(Math.floor(pct / 5)).padEnd(20, '.')}`;
        if (tty) process.stderr.write(`\rlayer ${p.layer}/${p.layers} [${bar}] ${pct}%   `);
        else if (!json && p.bytes >= p.total && !doneLayers.has(p.layer)) {
          doneLayers.add(p.layer);
          process.stderr.write(
            `layer ${p.layer}/${p.layers} ${p.digest.slice(0, 19)} ${(p.total / 1e6).toFixed(1)} MB\n`,
          );
        }
      },
    }),
  );
  if ('interrupted' in pulled) {
    if (tty) process.stderr.write('\n');
    process.stderr.write(`microvm: pull interrupted by ${pulled.interrupted}; nothing was stored\n`);
    return 128 + signalNumber(pulled.interrupted);
  }
  const r = pulled.value;
  if (tty) process.stderr.write('\n');
  out(
    {
      reference: r.reference,
      digest: r.digest,
      path: r.path,
      fromCache: r.fromCache,
      warnings: r.warnings,
      ...(r.previousDigest ? { previousDigest: r.previousDigest } : {}),
    },
    `${r.digest}  ${r.fromCache ? '(cached)' : 'pulled'}  ${r.path}${r.previousDigest ? `\n${r.reference} moved: it named ${r.previousDigest} before` : ''}`,
  );
  return 0;
}

/** `microvm images [-q]`. */
export async function cmdImages(c: CommandContext): Promise<number> {
  const { values, positional, cacheDir, out } = c;
  if (positional.length) throw new UsageError('images takes no arguments');
  const imgs = list(cacheDir);
  if (values.quiet) {
    out(
      imgs.map((i) => i.digest),
      imgs.map((i) => i.digest).join('\n'),
    );
    return 0;
  }
  const when = (iso: string): string => iso.slice(0, 16).replace('T', ' ');
  out(
    imgs,
    table(
      ['DIGEST', 'SIZE', 'LAST USED', 'REFERENCES'],
      imgs.map((i) => [
        i.digest.slice(0, 19),
        `${(i.bytes / 1e6).toFixed(1)} MB`,
        when(i.lastUsedAt),
        [
          ...i.references,
          ...i.formerReferences.map((f) => `(${f.reference} until ${when(f.until)}, now ${f.now.slice(0, 19)})`),
        ].join(', '),
      ]),
    ),
  );
  return 0;
}

/** `microvm cache gc|purge`. */
export async function cmdCache(c: CommandContext): Promise<number> {
  const { positional, cacheDir, out } = c;
  if (positional[0] === 'gc') {
    const removed = await gc(cacheDir);
    out({ removed }, `removed ${removed.length} entr${removed.length === 1 ? 'y' : 'ies'}`);
  } else if (positional[0] === 'purge') {
    purge(cacheDir);
    out({ purged: cacheDir }, `removed ${cacheDir}`);
  } else throw new UsageError('cache takes gc or purge');
  return 0;
}

/** `microvm prune`: ended VMs and unreferenced cache entries. */
export async function cmdPrune(c: CommandContext): Promise<number> {
  const { positional, dataDir, cacheDir, out } = c;
  if (positional.length) throw new UsageError('prune takes no arguments');
  const vms = await sweepVms(dataDir, true);
  const cache = await gc(cacheDir);
  out(
    { vms, cache },
    `removed ${vms.length} VM${vms.length === 1 ? '' : 's'}${vms.length ? ` (${vms.join(', ')})` : ''} and ${cache.length} cache entr${cache.length === 1 ? 'y' : 'ies'}`,
  );
  return 0;
}
