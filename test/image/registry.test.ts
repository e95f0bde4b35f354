/**
 * Pulls from Debian's docker-registry (distribution 2.8) on 127.0.0.1, with images pushed by
 * skopeo; one instance behind htpasswd basic auth; faults injected by an HTTP proxy in the test.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { context, SpanKind } from '@opentelemetry/api';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { gcImages, listImages, pull } from '../../lib';
import { redactedUrl } from '../../lib/image/http';
import { realmRefusal } from '../../lib/image/registry';
import { packageRoot } from '../../lib/native';
import { layoutSkipReason, scratch } from '../helpers';
import { freePort } from '../ssh/servers';

const layout = process.env.MICROVM_TEST_LAYOUT;
function missing(): string | undefined {
  if (!layout) return layoutSkipReason();
  for (const [cmd, arg] of [
    ['docker-registry', '--version'],
    ['skopeo', '--version'],
    ['htpasswd', '-h'],
  ]) {
    try {
      execFileSync(cmd, [arg], { stdio: 'ignore' });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return `${cmd} is not installed`;
    }
  }
  return undefined;
}
const skip = missing();
jest.setTimeout(120000); // registries, pushes and pulls share two cores with the VM tests

interface Registry {
  port: number;
  stop(): Promise<void>;
}

async function startRegistry(
  dir: string,
  auth?: { user: string; password: string },
  host = '127.0.0.1',
): Promise<Registry> {
  const port = await freePort();
  fs.mkdirSync(path.join(dir, 'storage'), { recursive: true });
  let authBlock = '';
  if (auth) {
    execFileSync('htpasswd', ['-Bbc', path.join(dir, 'htpasswd'), auth.user, auth.password], { stdio: 'ignore' });
    authBlock = `auth:\n  htpasswd:\n    realm: test\n    path: ${path.join(dir, 'htpasswd')}\n`;
  }
  fs.writeFileSync(
    path.join(dir, 'config.yml'),
    `version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: ${path.join(dir, 'storage')}\nhttp:\n  addr: ${host}:${port}\n${authBlock}`,
  );
  const child: ChildProcess = spawn('docker-registry', ['serve', path.join(dir, 'config.yml')], { stdio: 'ignore' });
  for (let i = 0; ; i++) {
    const ok = await fetch(`http://${host}:${port}/v2/`).then(
      (r) => r.status === 200 || r.status === 401,
      () => false,
    );
    if (ok) break;
    if (i > 1200 || child.exitCode !== null) throw new Error('docker-registry did not start');
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    port,
    stop: async () => {
      child.kill('SIGTERM');
      if (child.exitCode === null) await new Promise((r) => child.once('exit', r));
    },
  };
}

function push(target: string, creds?: string): void {
  execFileSync(
    'skopeo',
    [
      'copy',
      '--quiet',
      '--dest-tls-verify=false',
      ...(creds ? ['--dest-creds', creds] : []),
      `oci:${layout}:test`,
      `docker://${target}`,
    ],
    { stdio: 'ignore' },
  );
}

/** A non-loopback IPv4 address of this host (for the insecureRegistries test). */
const hostIp = Object.values(os.networkInterfaces())
  .flat()
  .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;

const tree = (dir: string): string =>
  execFileSync('sh', ['-c', "find . -printf '%p %y %m %s %l\\n' | sort"], { cwd: dir, encoding: 'utf8' });

(skip ? describe.skip : describe)(`pull from a registry${skip ? ` [skipped: ${skip}]` : ''}`, () => {
  let s: ReturnType<typeof scratch>;
  let open: Registry;
  let locked: Registry;
  let reference: string;
  beforeAll(async () => {
    s = scratch('microvm-registry-');
    open = await startRegistry(path.join(s.dir, 'open'));
    locked = await startRegistry(path.join(s.dir, 'locked'), { user: 'alice', password: 's3cret-pw' });
    reference = `127.0.0.1:${open.port}/test/img:v1`;
    push(reference);
    push(`127.0.0.1:${locked.port}/private/img:v1`, 'alice:s3cret-pw');
  });
  afterAll(async () => {
    await open?.stop();
    await locked?.stop();
    s?.cleanup();
  });

  test('pulls and unpacks the same tree as from the layout', async () => {
    const r = await pull(reference, { cacheDir: path.join(s.dir, 'c1') });
    const fromLayout = await pull(`oci:${layout}:test`, { cacheDir: path.join(s.dir, 'c1-layout') });
    expect(tree(r.path)).toBe(tree(fromLayout.path));
  });

  test('a warm pull needs no network: it works with the registry gone', async () => {
    const own = await startRegistry(path.join(s.dir, 'own'));
    const ref = `127.0.0.1:${own.port}/test/img:v1`;
    push(ref);
    const cacheDir = path.join(s.dir, 'c-warm');
    const cold = await pull(ref, { cacheDir });
    await own.stop();
    expect(await pull(ref, { cacheDir, policy: 'missing' })).toMatchObject({ fromCache: true, digest: cold.digest });
    // 'always' (pull()'s default) must ask the registry: gone, that is an error, never stale content.
    await expect(pull(ref, { cacheDir })).rejects.toMatchObject({
      code: expect.stringMatching(/^ERR_MICROVM_REGISTRY/),
    });
  });

  test('a tag pushed again with new content: the next pull gets it (an unchanged one is served from the cache); gc then removes the old tree and every blob no kept image was made from', async () => {
    const own = await startRegistry(path.join(s.dir, 'retag'));
    const ref = `127.0.0.1:${own.port}/test/img:latest`;
    const cacheDir = path.join(s.dir, 'c-retag');
    try {
      push(ref);
      const first = await pull(ref, { cacheDir });
      expect(await pull(ref, { cacheDir })).toMatchObject({ digest: first.digest, fromCache: true });
      // A new image under the same tag: one more layer (a file), pushed by skopeo.
      const variant = path.join(s.dir, 'variant');
      execFileSync('cp', ['-a', layout as string, variant]);
      const bundle = path.join(s.dir, 'variant-bundle');
      execFileSync(
        'umoci',
        ['unpack', ...(process.getuid?.() === 0 ? [] : ['--rootless']), '--image', `${variant}:test`, bundle],
        { stdio: 'ignore' },
      );
      fs.writeFileSync(path.join(bundle, 'rootfs', 'etc', 'security-fix'), 'patched\n');
      execFileSync('umoci', ['repack', '--image', `${variant}:test`, bundle], { stdio: 'ignore' });
      execFileSync('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `oci:${variant}:test`, `docker://${ref}`], {
        stdio: 'ignore',
      });
      const second = await pull(ref, { cacheDir });
      expect(second.digest).not.toBe(first.digest);
      expect(second).toMatchObject({ fromCache: false, previousDigest: first.digest });
      expect(fs.readFileSync(path.join(second.path, 'etc', 'security-fix'), 'utf8')).toBe('patched\n');
      const blobs = (): string[] => fs.readdirSync(path.join(cacheDir, 'blobs', 'sha256')).sort();
      const layersOf = (digest: string): string[] =>
        (
          JSON.parse(fs.readFileSync(path.join(cacheDir, 'images', digest.split(':')[1], 'image.json'), 'utf8'))
            .manifest.layers as { digest: string }[]
        )
          .map((l) => l.digest.split(':')[1])
          .sort();
      expect(layersOf(second.digest).length).toBe(layersOf(first.digest).length + 1);
      // A stray complete blob nothing was made from (an aborted image's download).
      fs.writeFileSync(path.join(cacheDir, 'blobs', 'sha256', 'f'.repeat(64)), 'stray');
      const removed = await gcImages(cacheDir);
      expect(removed).toContain(first.digest.split(':')[1]);
      expect(removed).toContain(`blobs/sha256/${'f'.repeat(64)}`);
      expect(listImages(cacheDir).map((i) => i.digest)).toEqual([second.digest]);
      // Exactly the layers the kept image was made from stay.
      expect(blobs()).toEqual(layersOf(second.digest));
      expect(fs.existsSync(second.path)).toBe(true);
    } finally {
      await own.stop();
    }
  });

  test('basic auth: refused without credentials, works with them, and the password is never in an error', async () => {
    const ref = `127.0.0.1:${locked.port}/private/img:v1`;
    const err = await pull(ref, {
      cacheDir: path.join(s.dir, 'c2'),
      credentials: { username: 'alice', password: 'wrong-pw' },
    }).catch((e: Error) => e);
    expect(err).toMatchObject({ code: 'ERR_MICROVM_REGISTRY_AUTH' });
    expect(JSON.stringify({ m: (err as Error).message, s: (err as Error).stack })).not.toContain('wrong-pw');
    const cfgDir = path.join(s.dir, 'docker-config');
    fs.mkdirSync(cfgDir, { recursive: true });
    fs.writeFileSync(
      path.join(cfgDir, 'config.json'),
      JSON.stringify({
        auths: { [`127.0.0.1:${locked.port}`]: { auth: Buffer.from('alice:s3cret-pw').toString('base64') } },
      }),
    );
    const old = process.env.DOCKER_CONFIG;
    process.env.DOCKER_CONFIG = cfgDir;
    try {
      const r = await pull(ref, { cacheDir: path.join(s.dir, 'c2') });
      expect(fs.existsSync(path.join(r.path, 'etc/layer2'))).toBe(true);
    } finally {
      if (old === undefined) delete process.env.DOCKER_CONFIG;
      else process.env.DOCKER_CONFIG = old;
    }
  });

  test('each registry request is an HTTP CLIENT span under microvm.image.Fetch, with no credential anywhere in it', async () => {
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const tracer = provider.getTracer('test');
    const ref = `127.0.0.1:${locked.port}/private/img:v1`;
    const r = await pull(ref, {
      cacheDir: path.join(s.dir, 'c-spans'),
      credentials: { username: 'alice', password: 's3cret-pw' },
      scope: { tracer, ctx: context.active() },
    });
    const spans = exporter.getFinishedSpans();
    const fetchSpan = spans.find((x) => x.name === 'microvm.image.Fetch');
    const gets = spans.filter((x) => x.name === 'GET');
    // the manifest (refused, then with credentials), the config, the two layers
    expect(fs.existsSync(path.join(r.path, 'etc/layer2'))).toBe(true);
    expect(gets.length).toBeGreaterThanOrEqual(5);
    for (const g of gets) {
      expect(g.kind).toBe(SpanKind.CLIENT);
      expect(g.parentSpanContext?.spanId).toBe(fetchSpan?.spanContext().spanId);
      expect(g.attributes).toMatchObject({
        'http.request.method': 'GET',
        'server.address': '127.0.0.1',
        'server.port': locked.port,
        'url.full': expect.stringMatching(new RegExp(`^http://127\\.0\\.0\\.1:${locked.port}/v2/private/img/`)),
      });
    }
    const statuses = gets.map((g) => g.attributes['http.response.status_code']);
    expect(statuses).toContain(401);
    expect(statuses).toContain(200);
    const refused = gets.find((g) => g.attributes['http.response.status_code'] === 401);
    expect(refused?.attributes['error.type']).toBe('401');
    const all = JSON.stringify(spans.map((x) => [x.name, x.attributes, x.events]));
    for (const secret of ['s3cret-pw', Buffer.from('alice:s3cret-pw').toString('base64')])
      expect(all).not.toContain(secret);
  });

  test("a credential helper (config.json credHelpers): asked with the registry's name on stdin, its answer used, never printed", async () => {
    const bin = path.join(s.dir, 'helper-bin');
    fs.mkdirSync(bin, { recursive: true });
    const asked = path.join(s.dir, 'helper-asked');
    fs.writeFileSync(
      path.join(bin, 'docker-credential-mvmtest'),
      `#!/bin/sh\n[ "$1" = get ] || exit 3\ncat > "${asked}"\necho '{"ServerURL":"x","Username":"alice","Secret":"s3cret-pw"}'\n`,
      { mode: 0o755 },
    );
    const cfgDir = path.join(s.dir, 'docker-config-helper');
    fs.mkdirSync(cfgDir, { recursive: true });
    const registry = `127.0.0.1:${locked.port}`;
    fs.writeFileSync(path.join(cfgDir, 'config.json'), JSON.stringify({ credHelpers: { [registry]: 'mvmtest' } }));
    const old = { path: process.env.PATH, cfg: process.env.DOCKER_CONFIG };
    process.env.PATH = `${bin}:${process.env.PATH}`;
    process.env.DOCKER_CONFIG = cfgDir;
    try {
      const r = await pull(`${registry}/private/img:v1`, { cacheDir: path.join(s.dir, 'c-helper') });
      expect(r.fromCache).toBe(false);
      expect(fs.readFileSync(asked, 'utf8')).toBe(registry);
      // A helper that fails: no credentials, so the locked registry refuses, and the message has no secret.
      fs.writeFileSync(path.join(bin, 'docker-credential-mvmtest'), '#!/bin/sh\necho s3cret-leak >&2; exit 1\n', {
        mode: 0o755,
      });
      const err = await pull(`${registry}/private/img:v1`, { cacheDir: path.join(s.dir, 'c-helper2') }).catch(
        (e: Error) => e,
      );
      expect(err).toMatchObject({ code: 'ERR_MICROVM_REGISTRY_AUTH' });
      expect((err as Error).message).not.toContain('s3cret');
    } finally {
      process.env.PATH = old.path;
      if (old.cfg === undefined) delete process.env.DOCKER_CONFIG;
      else process.env.DOCKER_CONFIG = old.cfg;
    }
  });

  (hostIp ? test : test.skip)(
    `insecureRegistries: a registry on a non-loopback address is reached over HTTPS unless listed, then over plain HTTP${hostIp ? '' : ' [skipped: this host has no non-loopback IPv4 address]'}`,
    async () => {
      const ip = hostIp as string;
      const own = await startRegistry(path.join(s.dir, 'on-ip'), undefined, ip);
      try {
        const registry = `${ip}:${own.port}`;
        execFileSync(
          'skopeo',
          ['copy', '--quiet', '--dest-tls-verify=false', `oci:${layout}:test`, `docker://${registry}/test/img:v1`],
          { stdio: 'ignore' },
        );
        const ref = `${registry}/test/img:v1`;
        const err = await pull(ref, { cacheDir: path.join(s.dir, 'c-insecure') }).catch((e: Error) => e);
        expect(err).toMatchObject({ code: 'ERR_MICROVM_REGISTRY' }); // TLS to a plain-HTTP registry fails
        const r = await pull(ref, { cacheDir: path.join(s.dir, 'c-insecure'), insecureRegistries: [registry] });
        expect(r.fromCache).toBe(false);
      } finally {
        await own.stop();
      }
    },
  );

  test('a missing tag: ERR_MICROVM_IMAGE_NOT_FOUND', async () => {
    await expect(
      pull(`127.0.0.1:${open.port}/test/img:nope`, { cacheDir: path.join(s.dir, 'c3') }),
    ).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_NOT_FOUND' });
  });

  describe('faults (a proxy between us and the registry)', () => {
    let proxy: http.Server;
    let proxyPort: number;
    let fault: (req: http.IncomingMessage, res: http.ServerResponse, n: number) => boolean = () => false;
    const counts = new Map<string, number>();
    beforeAll(async () => {
      proxyPort = await freePort();
      proxy = http.createServer((req, res) => {
        const key = `${req.method} ${String(req.url).replace(/\/blobs\/.*/, '/blobs/*')}`;
        const n = (counts.get(key) ?? 0) + 1;
        counts.set(key, n);
        if (fault(req, res, n)) return;
        const up = http.request(
          { host: '127.0.0.1', port: open.port, path: req.url, method: req.method, headers: req.headers },
          (ur) => {
            if (String(req.url).includes('/blobs/') && (fault as unknown as { corrupt?: boolean }).corrupt) {
              res.writeHead(ur.statusCode ?? 500, ur.headers);
              let first = true;
              ur.on('data', (c: Buffer) => {
                if (first) {
                  c = Buffer.from(c);
                  c[Math.min(100, c.length - 1)] ^= 0xff;
                  first = false;
                }
                res.write(c);
              });
              ur.on('end', () => res.end());
              return;
            }
            res.writeHead(ur.statusCode ?? 500, ur.headers);
            ur.pipe(res);
          },
        );
        req.pipe(up);
      });
      await new Promise<void>((r) => proxy.listen(proxyPort, '127.0.0.1', () => r()));
    });
    afterAll(() => new Promise<void>((r) => proxy.close(() => r())));
    beforeEach(() => {
      counts.clear();
      fault = () => false;
    });
    const ref = (): string => `127.0.0.1:${proxyPort}/test/img:v1`;

    test('429 with Retry-After, then success', async () => {
      fault = (req, res, n) => {
        if (String(req.url).includes('/manifests/') && n === 1) {
          res.writeHead(429, { 'retry-after': '1' }).end();
          return true;
        }
        return false;
      };
      const r = await pull(ref(), { cacheDir: path.join(s.dir, 'f1') });
      expect(r.fromCache).toBe(false);
      expect(counts.get('GET /v2/test/img/manifests/v1')).toBe(2); // refused once, asked again
    });

    test('a manifest dripped a byte at a time hits the document deadline: ERR_MICROVM_REGISTRY_TIMEOUT, nothing cached', async () => {
      let timer: NodeJS.Timeout | undefined;
      fault = (req, res) => {
        if (!String(req.url).includes('/manifests/')) return false;
        res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json' });
        timer = setInterval(() => res.write('{'), 100);
        res.on('close', () => clearInterval(timer));
        return true;
      };
      const cacheDir = path.join(s.dir, 'drip');
      const err = await pull(ref(), { cacheDir, documentTimeoutMs: 1000 }).catch((e: unknown) => e);
      clearInterval(timer);
      expect(err).toMatchObject({
        code: 'ERR_MICROVM_REGISTRY_TIMEOUT',
        message: expect.stringContaining('within 1000 ms'),
      });
      expect(listImages(cacheDir)).toEqual([]);
    });

    test.each([
      ['with a Content-Length (the socket fast path)', true],
      ['chunked (the general HTTP path)', false],
    ])(
      'a blob dripped slower than the minimum throughput, %s: ERR_MICROVM_REGISTRY_TIMEOUT, nothing cached',
      async (_how, sized) => {
        const timers: NodeJS.Timeout[] = [];
        fault = (req, res) => {
          if (!String(req.url).includes('/blobs/') || req.method !== 'GET') return false;
          // The real headers (Content-Length included), then the body a few bytes at a time.
          http.get({ host: '127.0.0.1', port: open.port, path: req.url, headers: req.headers }, (ur) => {
            const headers = { ...ur.headers };
            if (!sized) delete headers['content-length'];
            res.writeHead(ur.statusCode ?? 500, headers);
            const chunks: Buffer[] = [];
            ur.on('data', (c: Buffer) => chunks.push(c));
            ur.on('end', () => {
              const all = Buffer.concat(chunks);
              let at = 0;
              const t = setInterval(() => {
                if (at >= all.length) return res.end();
                res.write(all.subarray(at, at + 8));
                at += 8;
              }, 50);
              timers.push(t);
              res.on('close', () => clearInterval(t));
            });
          });
          return true;
        };
        const cacheDir = path.join(s.dir, `slow-blob-${String(sized)}`);
        const err = await pull(ref(), { cacheDir, throughput: { minBytesPerSecond: 2000, windowMs: 500 } }).catch(
          (e: unknown) => e,
        );
        for (const t of timers) clearInterval(t);
        expect(err).toMatchObject({
          code: 'ERR_MICROVM_REGISTRY_TIMEOUT',
          message: expect.stringMatching(/bytes in 500 ms, below the minimum of 1000/),
        });
        expect(listImages(cacheDir)).toEqual([]);
      },
    );

    test('microvm pull interrupted (SIGINT, SIGTERM) while a blob drips: it stops at once, exits 128+N, nothing is stored', async () => {
      const timers: NodeJS.Timeout[] = [];
      fault = (req, res) => {
        if (!String(req.url).includes('/blobs/') || req.method !== 'GET') return false;
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        timers.push(setInterval(() => res.write(Buffer.alloc(1)), 100));
        return true;
      };
      try {
        for (const [sig, code] of [
          ['SIGINT', 130],
          ['SIGTERM', 143],
        ] as const) {
          const data = path.join(s.dir, `interrupted-${sig}`);
          const child = spawn(process.execPath, [
            path.join(packageRoot, 'bin', 'microvm.js'),
            'pull',
            ref(),
            '--data-dir',
            data,
          ]);
          let stderr = '';
          child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          // Once it is fetching the blob: the drip has begun.
          while (!timers.length) await new Promise((r) => setTimeout(r, 20));
          const t0 = Date.now();
          child.kill(sig);
          const status = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
          expect({ status, stderr: stderr.slice(-200) }).toEqual({
            status: code,
            stderr: expect.stringContaining(`pull interrupted by ${sig}; nothing was stored`),
          });
          expect(Date.now() - t0).toBeLessThan(10_000);
          expect(listImages(path.join(data, 'cache'))).toEqual([]);
          for (const t of timers.splice(0)) clearInterval(t);
        }
      } finally {
        for (const t of timers) clearInterval(t);
      }
    });

    test('a manifest announced as 2 GB is refused by its size, before reading it', async () => {
      fault = (req, res) => {
        if (!String(req.url).includes('/manifests/')) return false;
        res.writeHead(200, {
          'content-type': 'application/vnd.oci.image.manifest.v1+json',
          'content-length': String(2 * 1024 ** 3),
        });
        res.write('{');
        return true;
      };
      await expect(pull(ref(), { cacheDir: path.join(s.dir, 'huge') })).rejects.toMatchObject({
        code: 'ERR_MICROVM_REGISTRY',
        message: expect.stringContaining('sent more than 4194304 bytes'),
      });
    });

    test('5xx twice, then success', async () => {
      fault = (req, res, n) => {
        if (String(req.url).includes('/blobs/') && n <= 2) {
          res.writeHead(503).end();
          return true;
        }
        return false;
      };
      await expect(pull(ref(), { cacheDir: path.join(s.dir, 'f2') })).resolves.toMatchObject({ fromCache: false });
    });

    test('a truncated blob: nothing cached', async () => {
      fault = (req, res) => {
        if (String(req.url).includes('/blobs/') && req.method === 'GET' && !String(req.url).endsWith('/')) {
          res.writeHead(200, { 'content-type': 'application/octet-stream' });
          res.end(Buffer.alloc(10));
          return true;
        }
        return false;
      };
      const cacheDir = path.join(s.dir, 'f3');
      await expect(pull(ref(), { cacheDir })).rejects.toMatchObject({
        code: expect.stringMatching(/ERR_MICROVM_IMAGE_(DIGEST|MANIFEST)/),
      });
      expect(listImages(cacheDir)).toEqual([]);
      // Whatever reached the blob cache is whole and verified (named by its content's digest).
      const blobs = path.join(cacheDir, 'blobs', 'sha256');
      for (const f of fs.existsSync(blobs) ? fs.readdirSync(blobs).filter((n) => !n.endsWith('.part')) : []) {
        expect(
          crypto
            .createHash('sha256')
            .update(fs.readFileSync(path.join(blobs, f)))
            .digest('hex'),
        ).toBe(f);
      }
    });

    test('a corrupted blob: ERR_MICROVM_IMAGE_DIGEST', async () => {
      fault = Object.assign(() => false, { corrupt: true });
      const cacheDir = path.join(s.dir, 'f4');
      await expect(pull(ref(), { cacheDir })).rejects.toMatchObject({ code: 'ERR_MICROVM_IMAGE_DIGEST' });
      expect(listImages(cacheDir)).toEqual([]);
    });

    test('bearer token flow: challenge, token from the realm (with scope), then the pull', async () => {
      const tokenRequests: string[] = [];
      fault = (req, res) => {
        const url = String(req.url);
        if (url.startsWith('/token')) {
          tokenRequests.push(url);
          res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: 'tok-123' }));
          return true;
        }
        if (url.startsWith('/v2/') && req.headers.authorization !== 'Bearer tok-123') {
          res
            .writeHead(401, {
              'www-authenticate': `Bearer realm="http://127.0.0.1:${proxyPort}/token",service="test-registry",scope="repository:test/img:pull"`,
            })
            .end();
          return true;
        }
        return false;
      };
      const r = await pull(ref(), { cacheDir: path.join(s.dir, 'f6') });
      expect(r.fromCache).toBe(false);
      expect(tokenRequests.length).toBeGreaterThanOrEqual(1);
      expect(tokenRequests[0]).toContain('service=test-registry');
      expect(decodeURIComponent(tokenRequests[0])).toContain('scope=repository:test/img:pull');
    });

    test('identityToken: the realm gets a refresh_token grant (POST, form-encoded) instead of Basic credentials', async () => {
      const grants: { method?: string; type?: string; body: string; auth?: string }[] = [];
      fault = (req, res) => {
        const url = String(req.url);
        if (url.startsWith('/token')) {
          let body = '';
          req.on('data', (c: Buffer) => (body += String(c)));
          req.on('end', () => {
            grants.push({
              method: req.method,
              type: req.headers['content-type'],
              body,
              auth: req.headers.authorization,
            });
            const ok = new URLSearchParams(body).get('refresh_token') === 'refresh-abc';
            res
              .writeHead(ok ? 200 : 401, { 'content-type': 'application/json' })
              .end(JSON.stringify(ok ? { access_token: 'acc-9' } : {}));
          });
          return true;
        }
        if (url.startsWith('/v2/') && req.headers.authorization !== 'Bearer acc-9') {
          res
            .writeHead(401, {
              'www-authenticate': `Bearer realm="http://127.0.0.1:${proxyPort}/token",service="svc"`,
            })
            .end();
          return true;
        }
        return false;
      };
      const r = await pull(ref(), {
        cacheDir: path.join(s.dir, 'f-idtoken'),
        credentials: { identityToken: 'refresh-abc' },
      });
      expect(r.fromCache).toBe(false);
      expect(grants[0]).toMatchObject({ method: 'POST', type: 'application/x-www-form-urlencoded', auth: undefined });
      const form = new URLSearchParams(grants[0].body);
      expect([form.get('grant_type'), form.get('service'), form.get('scope')]).toEqual([
        'refresh_token',
        'svc',
        'repository:test/img:pull',
      ]);
    });

    test('401 without a challenge we can answer: ERR_MICROVM_REGISTRY_AUTH', async () => {
      fault = (_req, res) => {
        res.writeHead(401, { 'www-authenticate': 'Basic realm="x"' }).end();
        return true;
      };
      await expect(pull(ref(), { cacheDir: path.join(s.dir, 'f5') })).rejects.toMatchObject({
        code: 'ERR_MICROVM_REGISTRY_AUTH',
      });
    });
  });
});

describe('token realm: credentials never downgraded to cleartext', () => {
  test('an HTTPS registry whose realm is plain HTTP on another host: refused with credentials, allowed anonymously', () => {
    expect(realmRefusal('https://registry.example', 'http://auth.example/token', true)).toMatch(
      /plain HTTP .*credentials are not sent in cleartext/,
    );
    expect(realmRefusal('https://registry.example', 'http://auth.example/token', false)).toBeUndefined();
  });

  test('HTTPS realms, loopback realms and insecure (HTTP) registries are allowed; other schemes never', () => {
    expect(realmRefusal('https://registry.example', 'https://auth.example/token', true)).toBeUndefined();
    expect(realmRefusal('https://registry.example', 'http://127.0.0.1:5001/token', true)).toBeUndefined();
    expect(realmRefusal('http://127.0.0.1:5000', 'http://127.0.0.1:5001/token', true)).toBeUndefined();
    expect(realmRefusal('https://registry.example', 'file:///etc/passwd', false)).toMatch(/file:, not http/);
    expect(realmRefusal('https://registry.example', 'not a url', false)).toMatch(/not a URL/);
  });
});

describe('redactedUrl (url.full on registry spans)', () => {
  test('drops user and password and redacts every query value', () => {
    expect(
      redactedUrl(
        new URL('https://u:p%40ss@blobs.example:8443/x/y?X-Amz-Signature=abc&scope=repo:a:pull&X-Amz-Signature=d'),
      ),
    ).toBe('https://blobs.example:8443/x/y?X-Amz-Signature=REDACTED&scope=REDACTED');
    expect(redactedUrl(new URL('http://127.0.0.1:5000/v2/a/manifests/v1'))).toBe(
      'http://127.0.0.1:5000/v2/a/manifests/v1',
    );
  });
});
