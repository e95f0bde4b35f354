/**
 * A registry client on node:http/https (./http; no npm client handles OCI indexes, digest verification and
 * Docker credential helpers well; see the environment survey): the /v2/ ping, bearer tokens from
 * `WWW-Authenticate`, basic auth, Docker's config.json (`auths`, `credsStore`, `credHelpers` via
 * `docker-credential-*`), OCI and Docker schema 2 manifests and indexes, platform selection, digest
 * verification of every manifest and blob, retries with backoff on 429/5xx/resets (honouring
 * `Retry-After`), and plain HTTP only for loopback registries or those listed as insecure.
 * Credentials never appear in errors, logs or spans.
 */

import { createHash } from 'node:crypto';
import * as fs from 'node:fs';

import * as path from 'node:path';
import { PassThrough, Readable, Transform } from 'node:stream';
import { MicrovmError } from '../errors';
import {
  clientSpan,
  endClientSpan,
  fastGet,
  type HttpRequest,
  type HttpResponse,
  request,
  type SocketBody,
} from './http';
import type { SpanScope } from '../telemetry/tracer';
import {
  checkManifest,
  type Descriptor,
  type ImageConfigFile,
  type ImageIndex,
  type ImageManifest,
  isIndex,
  markVerifying,
  MEDIA,
  parseJson,
  type Platform,
  selectPlatform,
  verifyDigest,
} from './oci';
import { type ResolvedImage, verifying } from './source';
import { dockerCredentials, isLoopback, realmRefusal, type RegistryCredentials } from './credentials';

export { dockerCredentials, realmRefusal, type RegistryCredentials } from './credentials';

const ACCEPT = [MEDIA.OCI_INDEX, MEDIA.OCI_MANIFEST, MEDIA.DOCKER_LIST, MEDIA.DOCKER_MANIFEST].join(', ');

export interface RegistryOptions {
  insecureRegistries?: string[];
  credentials?: RegistryCredentials;
  signal?: AbortSignal;
  /** Retries after the first attempt (4). */
  retries?: number;
  env?: NodeJS.ProcessEnv;
  /** Deadline for a whole small document (manifest, token, config), ms (60000). */
  documentTimeoutMs?: number;
  /**
   * Minimum download rate of a blob while it is being read: fewer than `minBytesPerSecond` (1024)
   * on average over any `windowMs` (30000) fails it with ERR_MICROVM_REGISTRY_TIMEOUT.
   */
  throughput?: { minBytesPerSecond?: number; windowMs?: number };
  /** Where each request's HTTP CLIENT span goes (pull passes microvm.image.Fetch's scope). */
  scope?: SpanScope;
}

const MIN_BYTES_PER_SECOND = 1024;
const THROUGHPUT_WINDOW_MS = 30_000;

/**
 * `body` with a throughput watchdog (see RegistryOptions.throughput). Only time the consumer is
 * waiting counts: a full buffer (the extractor busy) is not the registry's slowness.
 */
function watched(body: Readable, windowMs: number, minBytesPerSecond: number, what: string): Readable {
  const out = new PassThrough();
  const minimum = Math.ceil((minBytesPerSecond * windowMs) / 1000);
  let n = 0;
  let base = 0;
  const timer = setInterval(() => {
    if (out.destroyed || out.writableEnded) return clearInterval(timer);
    const backlogged = out.readableLength >= out.readableHighWaterMark || out.writableLength > 0;
    if (!backlogged && n - base < minimum) {
      clearInterval(timer);
      const err = new MicrovmError(
        'ERR_MICROVM_REGISTRY_TIMEOUT',
        `${what}: ${n - base} bytes in ${windowMs} ms, below the minimum of ${minimum} (${n} received)`,
      );
      body.destroy();
      out.destroy(err);
      return;
    }
    base = n;
  }, windowMs);
  timer.unref();
  body.on('data', (c: Buffer) => (n += c.length));
  body.on('error', (e) => {
    clearInterval(timer);
    out.destroy(e);
  });
  out.on('close', () => {
    clearInterval(timer);
    if (!body.readableEnded) body.destroy();
  });
  body.pipe(out);
  return out;
}

export class RegistryClient {
  readonly #registry: string;
  readonly #repository: string;
  readonly #base: string;
  readonly #opts: RegistryOptions;
  #auth: string | undefined;
  #credentials: RegistryCredentials | undefined;
  #credentialsLoaded = false;

  constructor(registry: string, repository: string, options: RegistryOptions = {}) {
    this.#registry = registry;
    this.#repository = repository;
    this.#opts = options;
    const insecure = isLoopback(registry) || (options.insecureRegistries ?? []).includes(registry);
    const host = registry === 'docker.io' ? 'registry-1.docker.io' : registry;
    this.#base = `${insecure ? 'http' : 'https'}://${host}`;
    this.#credentials = options.credentials;
    this.#credentialsLoaded = options.credentials !== undefined;
  }

  async #creds(): Promise<RegistryCredentials | undefined> {
    if (!this.#credentialsLoaded) {
      this.#credentials = await dockerCredentials(this.#registry, this.#opts.env);
      this.#credentialsLoaded = true;
    }
    return this.#credentials;
  }

  #where(): string {
    return `${this.#registry}/${this.#repository}`;
  }

  /** A request with retries on 429/5xx/network errors; Retry-After honoured (capped at 30 s). */
  async #fetchRetrying(url: string, init: HttpRequest): Promise<HttpResponse> {
    const retries = this.#opts.retries ?? 4;
    let lastErr: unknown;
    for (let attempt = 0; ; attempt++) {
      this.#opts.signal?.throwIfAborted();
      try {
        const res = await request(url, { ...init, signal: this.#opts.signal, scope: this.#opts.scope });
        if ((res.status === 429 || res.status >= 500) && attempt < retries) {
          const ra = Number(res.header('retry-after'));
          res.discard();
          await sleep(
            Number.isFinite(ra) && ra > 0 ? Math.min(ra * 1000, 30000) : 200 * 2 ** attempt,
            this.#opts.signal,
          );
          continue;
        }
        return res;
      } catch (err) {
        if ((err as Error).name === 'AbortError') throw err;
        if ((err as MicrovmError).code === 'ERR_MICROVM_REGISTRY') throw err; // redirect refused: final
        lastErr = err;
        if (attempt >= retries) break;
        await sleep(200 * 2 ** attempt, this.#opts.signal);
      }
    }
    throw new MicrovmError(
      'ERR_MICROVM_REGISTRY',
      `Cannot reach ${this.#registry}: ${(lastErr as Error)?.message ?? 'unknown error'}`,
      { cause: lastErr },
    );
  }

  /** A token for a Bearer challenge (anonymous or with credentials). */
  async #token(challenge: string): Promise<string> {
    const params: Record<string, string> = {};
    for (const m of challenge.matchAll(/(\w+)="([^"]*)"/g)) params[m[1]] = m[2];
    if (!params.realm)
      throw new MicrovmError('ERR_MICROVM_REGISTRY_AUTH', `${this.#registry} sent a Bearer challenge without a realm`);
    const creds = await this.#creds();
    const refusal = realmRefusal(this.#base, params.realm, creds !== undefined);
    if (refusal) throw new MicrovmError('ERR_MICROVM_REGISTRY_AUTH', `${this.#registry}: ${refusal}`);
    const url = new URL(params.realm);
    if (params.service) url.searchParams.set('service', params.service);
    url.searchParams.set('scope', params.scope ?? `repository:${this.#repository}:pull`);
    const headers: Record<string, string> = {};
    if (creds && 'username' in creds)
      headers.authorization = `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}`;
    let res: HttpResponse;
    if (creds && 'identityToken' in creds) {
      const body = new URLSearchParams({
        grant_type: 'refresh_token',
        refresh_token: creds.identityToken,
        service: params.service ?? '',
        scope: url.searchParams.get('scope') ?? '',
      });
      res = await this.#fetchRetrying(params.realm, {
        method: 'POST',
        body: body.toString(),
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
      });
    } else {
      res = await this.#fetchRetrying(url.toString(), { headers });
    }
    if (!res.ok) {
      res.discard();
      throw new MicrovmError(
        'ERR_MICROVM_REGISTRY_AUTH',
        `${this.#registry} refused a token for ${this.#repository} (HTTP ${res.status})`,
      );
    }
    let j: { token?: string; access_token?: string };
    try {
      j = JSON.parse((await res.buffer(1 << 20, this.#opts.documentTimeoutMs ?? 60_000)).toString('utf8')) as {
        token?: string;
        access_token?: string;
      };
    } catch (err) {
      throw new MicrovmError(
        'ERR_MICROVM_REGISTRY_AUTH',
        `${this.#registry} answered the token request with something other than JSON`,
        { cause: err },
      );
    }
    const t = j.token ?? j.access_token;
    if (!t) throw new MicrovmError('ERR_MICROVM_REGISTRY_AUTH', `${this.#registry} returned no token`);
    return `Bearer ${t}`;
  }

  /** GET with authentication; one re-try after answering a 401 challenge. */
  async get(pathname: string, accept?: string): Promise<HttpResponse> {
    const url = `${this.#base}/v2/${pathname}`;
    const headers = (): Record<string, string> => ({
      ...(accept ? { accept } : {}),
      ...(this.#auth ? { authorization: this.#auth } : {}),
    });
    let res = await this.#fetchRetrying(url, { headers: headers() });
    if (res.status === 401) {
      const challenge = res.header('www-authenticate') ?? '';
      res.discard();
      if (/^bearer/i.test(challenge)) this.#auth = await this.#token(challenge);
      else {
        const creds = await this.#creds();
        if (!creds || !('username' in creds))
          throw new MicrovmError(
            'ERR_MICROVM_REGISTRY_AUTH',
            `${this.#where()} needs credentials (docker login ${this.#registry}, or pass credentials)`,
          );
        this.#auth = `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}`;
      }
      res = await this.#fetchRetrying(url, { headers: headers() });
      if (res.status === 401 || res.status === 403) {
        res.discard();
        throw new MicrovmError(
          'ERR_MICROVM_REGISTRY_AUTH',
          `${this.#where()}: access denied (HTTP ${res.status}); check your credentials`,
        );
      }
    }
    return res;
  }

  /** A manifest or index by tag or digest, digest-verified. */
  async manifest(reference: string): Promise<{ body: Buffer; mediaType: string; digest: string }> {
    const res = await this.get(`${this.#repository}/manifests/${reference}`, ACCEPT);
    if (res.status === 404) {
      res.discard();
      throw new MicrovmError('ERR_MICROVM_IMAGE_NOT_FOUND', `${this.#where()}:${reference} was not found`);
    }
    if (!res.ok) {
      res.discard();
      throw new MicrovmError('ERR_MICROVM_REGISTRY', `${this.#where()}: manifest ${reference}: HTTP ${res.status}`);
    }
    let body: Buffer;
    try {
      body = await res.buffer(4 * 1024 * 1024, this.#opts.documentTimeoutMs ?? 60_000);
    } catch (err) {
      // A deadline or size refusal keeps its own code; anything else is a broken manifest.
      throw new MicrovmError(
        err instanceof MicrovmError ? err.code : 'ERR_MICROVM_IMAGE_MANIFEST',
        `${this.#where()}: manifest ${reference}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`;
    if (reference.includes(':')) verifyDigest(body, reference, `manifest ${reference}`);
    const header = res.header('docker-content-digest');
    if (header && header.startsWith('sha256:') && header !== digest)
      throw new MicrovmError(
        'ERR_MICROVM_IMAGE_DIGEST',
        `manifest ${reference}: the registry says ${header}, the content hashes to ${digest}`,
      );
    return { body, mediaType: (res.header('content-type') ?? '').split(';')[0], digest };
  }

  /**
   * A blob over plain HTTP into one reused buffer (see SocketBody: verified as it is read), or
   * undefined when the registry is not plain HTTP or answers anything but a plain 200.
   */
  async fastBlob(d: Descriptor): Promise<SocketBody | undefined> {
    if (!this.#base.startsWith('http:') || !/^sha256:[a-f0-9]{64}$/.test(d.digest) || !(d.size >= 0)) return undefined;
    if (!this.#auth && (await this.#creds())) return undefined; // let the general path answer the challenge
    const url = new URL(`${this.#base}/v2/${this.#repository}/blobs/${d.digest}`);
    const startTime = performance.timeOrigin + performance.now();
    const body = await fastGet(
      url,
      this.#auth ? { authorization: this.#auth } : {},
      d.size,
      d.digest,
      this.#opts.signal,
    );
    // Only a body the fast path took gets a span here (otherwise the general path makes its own).
    const span = body ? clientSpan(this.#opts.scope, 'GET', url, startTime) : undefined;
    if (span && body) {
      body.once('end', () => endClientSpan(span, 200));
      body.once('error', (e: Error) => endClientSpan(span, 200, e));
    }
    return body?.watchThroughput(
      this.#opts.throughput?.windowMs ?? THROUGHPUT_WINDOW_MS,
      this.#opts.throughput?.minBytesPerSecond ?? MIN_BYTES_PER_SECOND,
    );
  }

  /** A blob as a stream (not yet verified: wrap it with `verifying`). */
  async blob(d: Descriptor): Promise<Readable> {
    const res = await this.get(`${this.#repository}/blobs/${d.digest}`);
    if (res.status === 404) {
      res.discard();
      throw new MicrovmError('ERR_MICROVM_IMAGE_NOT_FOUND', `${this.#where()}: blob ${d.digest} was not found`);
    }
    if (!res.ok) {
      res.discard();
      throw new MicrovmError('ERR_MICROVM_REGISTRY', `${this.#where()}: blob ${d.digest}: HTTP ${res.status}`);
    }
    return watched(
      res.body,
      this.#opts.throughput?.windowMs ?? THROUGHPUT_WINDOW_MS,
      this.#opts.throughput?.minBytesPerSecond ?? MIN_BYTES_PER_SECOND,
      `${this.#where()}: blob ${d.digest.slice(0, 19)}`,
    );
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Resolves a registry reference; layer blobs are downloaded (a few at once) into the blob cache
 * `blobDir` by digest and verified before extraction reads them.
 */
export async function resolveRegistryImage(
  ref: { registry: string; repository: string; tag?: string; digest?: string; canonical: string },
  platform: Platform,
  options: RegistryOptions & {
    blobDir?: string;
    concurrency?: number;
    /** Whether an image (manifest digest) is already unpacked: then nothing is downloaded. */
    have?: (digest: string) => boolean;
  },
): Promise<ResolvedImage> {
  const client = new RegistryClient(ref.registry, ref.repository, options);
  let m = await client.manifest(ref.digest ?? (ref.tag as string));
  let parsed = parseJson<ImageManifest & ImageIndex>(m.body, `manifest of ${ref.canonical}`);
  for (let depth = 0; isIndex(parsed, m.mediaType); depth++) {
    if (depth > 4) throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${ref.canonical}: indexes nested too deep`);
    const d = selectPlatform(parsed, platform, ref.canonical);
    m = await client.manifest(d.digest);
    parsed = parseJson<ImageManifest & ImageIndex>(m.body, `manifest of ${ref.canonical}`);
  }
  const manifest = checkManifest(parsed, `manifest of ${ref.canonical}`);
  if (options.have?.(m.digest)) {
    // A re-resolved tag that names an image already unpacked: the caller serves it from the cache.
    const unused = (): never => {
      throw new MicrovmError('ERR_MICROVM_IMAGE_MANIFEST', `${ref.canonical}: the image is cached; nothing to fetch`);
    };
    return { digest: m.digest, manifest, config: {} as ImageConfigFile, openBlob: async () => unused() };
  }
  const blobDir = options.blobDir;
  const layers = manifest.layers;
  const blobFile = (d: Descriptor): string => path.join(blobDir as string, d.digest.replace(':', '/'));
  const cached = (d: Descriptor): boolean => {
    const file = blobFile(d);
    return fs.existsSync(file) && fs.statSync(file).size === d.size;
  };
  // Where a blob goes, and the temporary name it is written under until its digest matched.
  const staging = (d: Descriptor): { file: string; tmp: string } => {
    const file = blobFile(d);
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
    return { file, tmp: `${file}.${process.pid}.${Math.random().toString(36).slice(2)}.part` };
  };
  // The first layer's request goes out with the config's (a registry answers blobs in a few ms
  // each, a loopback one included): its body waits, paused, until extraction takes it.
  let early: Promise<SocketBody | undefined> | undefined =
    blobDir && layers.length > 0 && !cached(layers[0]) ? client.fastBlob(layers[0]).catch(() => undefined) : undefined;
  const dropEarly = (): void => {
    void early?.then((b) => b?.destroy());
    early = undefined;
  };
  // The config is only needed once the tree is stored: it downloads while layers extract.
  const config = (async (): Promise<ImageConfigFile> => {
    const cfgStream = verifying(await client.blob(manifest.config), manifest.config, `config of ${ref.canonical}`);
    const chunks: Buffer[] = [];
    for await (const c of cfgStream) chunks.push(c as Buffer);
    return parseJson<ImageConfigFile>(Buffer.concat(chunks), `config of ${ref.canonical}`);
  })();
  config.catch(() => undefined); // awaited by the caller; never an unhandled rejection meanwhile

  // Prefetch layers into the blob cache, a few at a time, each verified before it is published.
  const fetched = new Map<string, Promise<string>>();
  const download = (d: Descriptor): Promise<string> => {
    const existing = fetched.get(d.digest);
    if (existing) return existing;
    const p = (async () => {
      if (!blobDir) throw new Error('no blob cache');
      if (cached(d)) return blobFile(d);
      const { file, tmp } = staging(d);
      try {
        const stream = verifying(await client.blob(d), d, `layer ${d.digest}`);
        await new Promise<void>((resolve, reject) => {
          const out = fs.createWriteStream(tmp, { mode: 0o644 });
          stream.on('error', (e) => {
            out.destroy();
            reject(e);
          });
          out.on('error', reject);
          out.on('finish', resolve);
          stream.pipe(out);
        });
        fs.renameSync(tmp, file);
        return file;
      } catch (err) {
        fs.rmSync(tmp, { force: true });
        throw err;
      }
    })();
    fetched.set(d.digest, p);
    p.catch(() => undefined);
    return p;
  };
  const concurrency = Math.max(1, options.concurrency ?? 3);
  // Layers after the first are prefetched into the blob cache, a few at a time; the one being
  // extracted streams straight from the registry into the extractor and, at once, into the cache.
  if (blobDir) layers.slice(1, 1 + concurrency).forEach((d) => void download(d));
  // One pass over the bytes: hash and count them (verification), copy them into the blob cache
  // (published by rename only once the digest matched), and hand them to the extractor.
  const streamAndKeep = async (d: Descriptor): Promise<Readable> => {
    const { file, tmp } = staging(d);
    const src = await client.blob(d);
    const [alg, want] = d.digest.split(':');
    const hash = createHash(alg);
    let size = 0;
    let verified = false;
    let copyFailed = false;
    const what = `layer ${d.digest}`;
    const out = fs.createWriteStream(tmp, { mode: 0o644 });
    out.on('error', () => {
      copyFailed = true; // the cache copy is optional: extraction goes on without it
    });
    out.on('close', () => {
      if (!verified || copyFailed) fs.rmSync(tmp, { force: true });
    });
    const t = new Transform({
      highWaterMark: 1 << 20,
      transform(chunk: Buffer, _enc, cb) {
        size += chunk.length;
        if (size > d.size)
          return cb(
            new MicrovmError(
              'ERR_MICROVM_IMAGE_DIGEST',
              `${what}: more than the ${d.size} bytes its descriptor states`,
            ),
          );
        hash.update(chunk);
        if (copyFailed || out.write(chunk)) return cb(null, chunk);
        out.once('drain', () => cb(null, chunk));
      },
      flush(cb) {
        const got = hash.digest('hex');
        if (got !== want)
          return cb(
            new MicrovmError(
              'ERR_MICROVM_IMAGE_DIGEST',
              `${what}: digest mismatch (expected ${d.digest}, got ${alg}:${got})`,
            ),
          );
        if (size !== d.size)
          return cb(new MicrovmError('ERR_MICROVM_IMAGE_DIGEST', `${what}: ${size} bytes, descriptor says ${d.size}`));
        verified = true;
        out.end(() => {
          if (copyFailed) return;
          try {
            fs.renameSync(tmp, file);
          } catch {
            fs.rmSync(tmp, { force: true });
          }
        });
        cb();
      },
    });
    src.on('error', (e) => t.destroy(e));
    t.on('close', () => {
      if (!src.destroyed) src.destroy();
      if (!verified) out.destroy();
    });
    return markVerifying(src.pipe(t));
  };
  // Plain HTTP (a loopback registry or mirror): off the socket into one reused buffer, with the
  // cache copy written by the extractor (SocketBody.tee).
  const fastAndKeep = async (d: Descriptor): Promise<SocketBody | undefined> => {
    let body: SocketBody | undefined;
    if (early && d.digest === layers[0].digest) {
      body = await early;
      early = undefined;
    } else {
      body = await client.fastBlob(d);
    }
    if (!body) return undefined;
    const { file, tmp } = staging(d);
    let fd = -1;
    try {
      fd = fs.openSync(tmp, 'wx', 0o644);
    } catch {
      return body; // no cache copy, still a fast read
    }
    body.tee = {
      fd,
      commit(ok) {
        if (fd < 0) return;
        fs.closeSync(fd);
        fd = -1;
        try {
          if (ok)
            fs.renameSync(tmp, file); // the body ended: its digest matched
          else fs.rmSync(tmp, { force: true });
        } catch {
          fs.rmSync(tmp, { force: true });
        }
      },
    };
    return body;
  };
  return {
    digest: m.digest,
    manifest,
    config,
    async openBlob(d) {
      if (!blobDir) return verifying(await client.blob(d), d, `layer ${d.digest}`);
      const i = layers.findIndex((l) => l.digest === d.digest);
      if (i >= 0 && i + concurrency < layers.length) void download(layers[i + concurrency]);
      if (!fetched.has(d.digest) && !cached(d)) return (await fastAndKeep(d)) ?? streamAndKeep(d);
      return fs.createReadStream(await download(d), { highWaterMark: 1 << 20 });
    },
    close: dropEarly,
  };
}
