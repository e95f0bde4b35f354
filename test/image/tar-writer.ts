/** Writes tar archives for tests, including ones no well-behaved tool would make (hostile layers). */
import * as zlib from 'node:zlib';

export interface Member {
  path: string;
  type?: 'file' | 'dir' | 'symlink' | 'hardlink' | 'char' | 'fifo' | 'sparse';
  data?: string | Buffer;
  linkpath?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  /** Extra PAX records for this member (e.g. GNU.sparse.* of a PAX sparse file). */
  pax?: Record<string, string>;
}

const FLAGS = { file: '0', hardlink: '1', symlink: '2', char: '3', dir: '5', fifo: '6', sparse: 'S' } as const;

function octal(n: number, len: number): string {
  return `${n.toString(8).padStart(len - 1, '0')}\0`;
}

function header(m: Member, size: number, name: string): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0, 100, 'utf8');
  h.write(octal(m.mode ?? (m.type === 'dir' ? 0o755 : 0o644), 8), 100, 'ascii');
  h.write(octal(m.uid ?? 0, 8), 108, 'ascii');
  h.write(octal(m.gid ?? 0, 8), 116, 'ascii');
  h.write(octal(size, 12), 124, 'ascii');
  h.write(octal(m.mtime ?? 1700000000, 12), 136, 'ascii');
  h.write('        ', 148, 'ascii');
  h.write(FLAGS[m.type ?? 'file'], 156, 'ascii');
  h.write((m.linkpath ?? '').slice(0, 99), 157, 'utf8');
  h.write('ustar\0', 257, 'latin1');
  h.write('00', 263, 'ascii');
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += h[i];
  h.write(octal(sum, 7), 148, 'ascii');
  return h;
}

function pax(records: Record<string, string>): Buffer {
  let body = '';
  for (const [k, v] of Object.entries(records)) {
    const rec = ` ${k}=${v}\n`;
    let len = rec.length + 1;
    while (String(len).length + rec.length !== len) len = String(len).length + rec.length;
    body += `${len}${rec}`;
  }
  return Buffer.from(body);
}

/** A tar archive of `members` (PAX headers for long paths/link targets). */
export function tar(members: Member[]): Buffer {
  const parts: Buffer[] = [];
  for (const m of members) {
    const data =
      m.type === undefined || m.type === 'file' || m.type === 'sparse' ? Buffer.from(m.data ?? '') : Buffer.alloc(0);
    if (Buffer.byteLength(m.path) > 99 || Buffer.byteLength(m.linkpath ?? '') > 99 || m.pax) {
      const body = pax({ path: m.path, ...(m.linkpath ? { linkpath: m.linkpath } : {}), ...m.pax });
      const ph = header({ path: 'PaxHeader', mode: 0o644 }, body.length, 'PaxHeader');
      ph.write('x', 156, 'ascii');
      let sum = 0;
      ph.write('        ', 148, 'ascii');
      for (let i = 0; i < 512; i++) sum += ph[i];
      ph.write(octal(sum, 7), 148, 'ascii');
      parts.push(ph, body, Buffer.alloc((512 - (body.length % 512)) % 512));
    }
    parts.push(header(m, data.length, m.path.slice(0, 99)), data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

export const gzip = (b: Buffer): Buffer => zlib.gzipSync(b);
