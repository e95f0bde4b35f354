/**
 * The registry's HTTP transport, on node:http/https rather than fetch: a layer body arrives as a
 * Node stream straight from the socket. Through fetch (undici's web streams, then
 * Readable.fromWeb) the same download cost about twice the JS-thread CPU per byte, and that
 * thread also parses the layer (bench/pull.js). Redirects are followed (registries send blobs to
 * object storage), credentials are dropped when a redirect leaves the origin, an https -> http
 * downgrade is refused, and a silent connection times out.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import { MicrovmError } from '../errors';

/** A response whose body has not been read yet. */
export interface HttpResponse {
  status: number;
  ok: boolean;
  /** The URL that answered (after redirects). */
  url: string;
  header(name: string): string | undefined;
  body: http.IncomingMessage;
  /** The whole body, refusing more than `max` bytes. */
  buffer(max: number): Promise<Buffer>;
  /** Drops the body (the connection is closed rather than drained). */
  discard(): void;
}

export interface HttpRequest {
  method?: 'GET' | 'POST';
  headers?: Record<string, string>;
  body?: string;
  signal?: AbortSignal;
  /** Socket inactivity limit, ms (60 s). */
  idleTimeoutMs?: number;
  /** Redirects followed (10). */
  maxRedirects?: number;
}

const agents = { http: new http.Agent({ keepAlive: true }), https: new https.Agent({ keepAlive: true }) };

function once(url: URL, init: HttpRequest, headers: Record<string, string>, method: string, body: string | undefined): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const secure = url.protocol === 'https:';
    const req = (secure ? https : http).request(url, { method, headers, agent: secure ? agents.https : agents.http, signal: init.signal }, resolve);
    req.setTimeout(init.idleTimeoutMs ?? 60_000, () => req.destroy(new Error(`no data from ${url.host} for ${Math.round((init.idleTimeoutMs ?? 60_000) / 1000)} s`)));
    req.on('error', reject);
    req.end(body);
  });
}

/** Sends a request, following redirects; resolves once the final response's headers arrived. */
export async function request(target: string, init: HttpRequest = {}): Promise<HttpResponse> {
  let url = new URL(target);
  let method: string = init.method ?? 'GET';
  let body = init.body;
  const headers = { ...init.headers };
  if (body !== undefined) headers['content-length'] = String(Buffer.byteLength(body));
  for (let redirects = 0; ; redirects++) {
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new MicrovmError('ERR_MICROVM_REGISTRY', `Refusing a ${url.protocol} URL from the registry`);
    const res = await once(url, init, headers, method, body);
    const status = res.statusCode ?? 0;
    const location = res.headers.location;
    if ([301, 302, 303, 307, 308].includes(status) && location) {
      res.destroy();
      if (redirects >= (init.maxRedirects ?? 10)) throw new MicrovmError('ERR_MICROVM_REGISTRY', `Too many redirects from ${url.host}`);
      const next = new URL(location, url);
      if (url.protocol === 'https:' && next.protocol === 'http:') throw new MicrovmError('ERR_MICROVM_REGISTRY', `Refusing a redirect from https to http (${next.host})`);
      if (next.origin !== url.origin) delete headers.authorization; // never hand credentials to another host
      if (status === 303 || ((status === 301 || status === 302) && method === 'POST')) {
        method = 'GET';
        body = undefined;
        delete headers['content-length'];
        delete headers['content-type'];
      }
      url = next;
      continue;
    }
    const answered = url.toString();
    return {
      status,
      ok: status >= 200 && status < 300,
      url: answered,
      header: (name) => {
        const v = res.headers[name.toLowerCase()];
        return Array.isArray(v) ? v.join(', ') : v;
      },
      body: res,
      buffer: (max) =>
        new Promise<Buffer>((resolve, reject) => {
          const chunks: Buffer[] = [];
          let n = 0;
          res.on('data', (c: Buffer) => {
            n += c.length;
            if (n > max) {
              res.destroy();
              reject(new MicrovmError('ERR_MICROVM_REGISTRY', `${url.host} sent more than ${max} bytes where a small document was expected`));
              return;
            }
            chunks.push(c);
          });
          res.on('end', () => resolve(Buffer.concat(chunks)));
          res.on('error', reject);
          res.on('aborted', () => reject(new MicrovmError('ERR_MICROVM_REGISTRY', `${url.host} closed the connection mid-response`)));
        }),
      discard: () => res.destroy(),
    };
  }
}
