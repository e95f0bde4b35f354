/**
 * A streaming tar reader for image layers (ustar, GNU long names/links, PAX headers). Written here
 * because node-tar rewrites absolute symlink targets, is 3–5x slower than GNU tar on layers, and
 * crashes on zstd under Node 20 (environment survey). It only parses: the extractor decides what
 * each entry may do.
 */
import { MicrovmError } from '../errors';

/** One archive member's header. */
export interface TarHeader {
  /** Path as stored (PAX `path` and GNU long names applied). */
  path: string;
  type: 'file' | 'hardlink' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo' | 'other';
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Seconds since the epoch (fractional from PAX). */
  mtime: number;
  linkpath: string;
}

/** What the reader calls for each member. */
export interface TarSink {
  entry(header: TarHeader): void;
  /** File contents, in order; only between entry() of a file and the next entry(). */
  data(chunk: Buffer): void;
  /** End of the current member's data. */
  endEntry(): void;
}

const BLOCK = 512;

function cstring(buf: Buffer, start: number, len: number): string {
  const end = buf.indexOf(0, start);
  return buf.toString('utf8', start, end < 0 || end > start + len ? start + len : end);
}

function number(buf: Buffer, start: number, len: number, field: string): number {
  if (buf[start] & 0x80) {
    // base-256: big-endian, first byte's top bit is the marker
    let v = buf[start] & 0x7f;
    for (let i = 1; i < len; i++) v = v * 256 + buf[start + i];
    if (!Number.isSafeInteger(v)) throw bad(`${field} too large`);
    return v;
  }
  const s = cstring(buf, start, len).trim();
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw bad(`bad octal ${field} ${JSON.stringify(s)}`);
  return parseInt(s, 8);
}

function bad(msg: string): MicrovmError {
  return new MicrovmError('ERR_MICROVM_IMAGE_LAYER', `Malformed layer archive: ${msg}`);
}

const TYPES: Record<string, TarHeader['type']> = { '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '3': 'char', '4': 'block', '5': 'dir', '6': 'fifo' };

function parsePax(body: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < body.length) {
    const sp = body.indexOf(0x20, i);
    if (sp < 0) break;
    const len = Number(body.toString('ascii', i, sp));
    if (!Number.isInteger(len) || len <= 0 || i + len > body.length) throw bad('bad PAX record');
    const rec = body.toString('utf8', sp + 1, i + len - 1);
    const eq = rec.indexOf('=');
    if (eq > 0) out[rec.slice(0, eq)] = rec.slice(eq + 1);
    i += len;
  }
  return out;
}

/** Push-based parser: feed() chunks, then end(). */
export class TarReader {
  #buf: Buffer = Buffer.alloc(0);
  #remaining = 0; // bytes of current member data still to pass on
  #padding = 0; // bytes to skip after it
  #meta: 'pax' | 'gpax' | 'longname' | 'longlink' | undefined;
  #metaBuf: Buffer[] = [];
  #pax: Record<string, string> = {};
  #globalPax: Record<string, string> = {};
  #longName: string | undefined;
  #longLink: string | undefined;
  #ended = false;
  #inFile = false;
  readonly #sink: TarSink;
  readonly #maxMeta: number;

  constructor(sink: TarSink, options: { maxMetadataBytes?: number } = {}) {
    this.#sink = sink;
    this.#maxMeta = options.maxMetadataBytes ?? 1 << 20;
  }

  feed(chunk: Buffer): void {
    let data = this.#buf.length ? Buffer.concat([this.#buf, chunk]) : chunk;
    this.#buf = Buffer.alloc(0);
    for (;;) {
      if (this.#remaining > 0) {
        if (data.length === 0) return;
        const n = Math.min(this.#remaining, data.length);
        const part = data.subarray(0, n);
        if (this.#meta) {
          this.#metaBuf.push(Buffer.from(part));
        } else {
          this.#sink.data(part);
        }
        this.#remaining -= n;
        data = data.subarray(n);
        if (this.#remaining > 0) return;
        this.#finishMember();
      }
      if (this.#padding > 0) {
        const n = Math.min(this.#padding, data.length);
        this.#padding -= n;
        data = data.subarray(n);
        if (this.#padding > 0) return;
      }
      if (this.#ended) return; // trailing blocks
      if (data.length < BLOCK) {
        this.#buf = Buffer.from(data);
        return;
      }
      const header = data.subarray(0, BLOCK);
      data = data.subarray(BLOCK);
      this.#header(header);
    }
  }

  /** Call when the input ended; throws if it ended inside a member. */
  end(): void {
    if (this.#remaining > 0 || this.#padding > 0 || (this.#buf.length > 0 && !this.#ended)) throw bad('truncated archive');
    if (this.#inFile) this.#sink.endEntry();
    this.#inFile = false;
  }

  #finishMember(): void {
    if (this.#meta) {
      const body = Buffer.concat(this.#metaBuf);
      this.#metaBuf = [];
      if (this.#meta === 'pax') this.#pax = parsePax(body);
      else if (this.#meta === 'gpax') this.#globalPax = { ...this.#globalPax, ...parsePax(body) };
      else if (this.#meta === 'longname') this.#longName = cstring(body, 0, body.length);
      else this.#longLink = cstring(body, 0, body.length);
      this.#meta = undefined;
    } else if (this.#inFile) {
      this.#inFile = false;
      this.#sink.endEntry();
    }
  }

  #header(h: Buffer): void {
    if (h.every((b) => b === 0)) {
      this.#ended = true; // end-of-archive marker (a second zero block may follow)
      return;
    }
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i];
    if (number(h, 148, 8, 'checksum') !== sum) throw bad('header checksum mismatch');
    const flag = String.fromCharCode(h[156]);
    const size = number(h, 124, 12, 'size');
    this.#padding = (BLOCK - (size % BLOCK)) % BLOCK;
    if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
      if (size > this.#maxMeta) throw bad('metadata member too large');
      this.#meta = flag === 'x' ? 'pax' : flag === 'g' ? 'gpax' : flag === 'L' ? 'longname' : 'longlink';
      this.#remaining = size;
      if (size === 0) this.#finishMember();
      return;
    }
    const magic = h.toString('latin1', 257, 263);
    const prefix = magic.startsWith('ustar') ? cstring(h, 345, 155) : '';
    let name = cstring(h, 0, 100);
    if (prefix) name = `${prefix}/${name}`;
    const pax = { ...this.#globalPax, ...this.#pax };
    const header: TarHeader = {
      path: pax.path ?? this.#longName ?? name,
      type: TYPES[flag] ?? 'other',
      mode: number(h, 100, 8, 'mode') & 0o7777,
      uid: pax.uid !== undefined ? Number(pax.uid) : number(h, 108, 8, 'uid'),
      gid: pax.gid !== undefined ? Number(pax.gid) : number(h, 116, 8, 'gid'),
      size: pax.size !== undefined ? Number(pax.size) : size,
      mtime: pax.mtime !== undefined ? Number(pax.mtime) : number(h, 136, 12, 'mtime'),
      linkpath: pax.linkpath ?? this.#longLink ?? cstring(h, 157, 100),
    };
    if (!Number.isSafeInteger(header.size) || header.size < 0) throw bad('bad size');
    if (!Number.isSafeInteger(header.uid) || !Number.isSafeInteger(header.gid)) throw bad('bad uid/gid');
    this.#pax = {};
    this.#longName = undefined;
    this.#longLink = undefined;
    // Only regular files carry data; a size on anything else is skipped.
    this.#padding = (BLOCK - (header.size % BLOCK)) % BLOCK;
    this.#sink.entry(header);
    if (header.type === 'file') {
      this.#inFile = true;
      this.#remaining = header.size;
      if (header.size === 0) this.#finishMember();
    } else {
      this.#remaining = 0;
      // Skip a (non-standard) body on non-file members.
      this.#padding = header.size + ((BLOCK - (header.size % BLOCK)) % BLOCK);
    }
  }
}
