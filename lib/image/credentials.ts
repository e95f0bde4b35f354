/**
 * Where a registry client's credentials come from and where they may go: Docker's config.json
 * (`auths`, `credsStore`, `credHelpers` through `docker-credential-*`), and which token realms may
 * receive them. Credentials never appear in errors, logs or spans.
 */
import { execFile } from 'node:child_process';

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** Credentials for one registry (never logged). */
export type RegistryCredentials = { username: string; password: string } | { identityToken: string };

export function isLoopback(registry: string): boolean {
  const host = registry.replace(/:\d+$/, '').replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

/**
 * Where a Bearer challenge may send credentials: the realm must be http(s); when the registry was
 * reached over HTTPS, a realm over plain HTTP (a downgrade to cleartext) is refused unless it is on
 * loopback. Returns the refusal's message, or undefined when the realm is acceptable.
 */
export function realmRefusal(registryBase: string, realm: string, withCredentials: boolean): string | undefined {
  let url: URL;
  try {
    url = new URL(realm);
  } catch {
    return `its token realm ${JSON.stringify(realm)} is not a URL`;
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') return `its token realm uses ${url.protocol}, not http(s)`;
  const downgrade = registryBase.startsWith('https:') && url.protocol === 'http:' && !isLoopback(url.host);
  if (downgrade && withCredentials) {
    return `it sent a token realm over plain HTTP (${url.origin}) although the registry is HTTPS; credentials are not sent in cleartext`;
  }
  return undefined;
}

function configKey(registry: string): string[] {
  return registry === 'docker.io'
    ? ['https://index.docker.io/v1/', 'index.docker.io', 'docker.io', 'registry-1.docker.io']
    : [registry, `https://${registry}`, `http://${registry}`];
}

function credentialHelper(
  helper: string,
  registry: string,
  env: NodeJS.ProcessEnv,
): Promise<RegistryCredentials | undefined> {
  if (!/^[A-Za-z0-9_.-]+$/.test(helper)) return Promise.resolve(undefined);
  return new Promise((resolve) => {
    // Found on env's PATH and run with env (the options' env, else this process's).
    const child = execFile(`docker-credential-${helper}`, ['get'], { timeout: 15000, env }, (err, stdout) => {
      if (err) return resolve(undefined); // a helper's output may contain secrets: never echo it
      try {
        const r = JSON.parse(String(stdout)) as { Username?: string; Secret?: string };
        if (!r.Secret) return resolve(undefined);
        resolve(
          r.Username === '<token>' ? { identityToken: r.Secret } : { username: r.Username ?? '', password: r.Secret },
        );
      } catch {
        resolve(undefined);
      }
    });
    // A helper may exit without reading its stdin: the write then fails with EPIPE, which is
    // not an answer (the exit callback above decides), never an uncaught error.
    child.stdin?.on('error', () => undefined);
    child.stdin?.end(registry === 'docker.io' ? 'https://index.docker.io/v1/' : registry);
  });
}

/** Credentials for `registry` from Docker's config.json ($DOCKER_CONFIG or ~/.docker). */
export async function dockerCredentials(
  registry: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<RegistryCredentials | undefined> {
  const file = path.join(env.DOCKER_CONFIG ?? path.join(os.homedir(), '.docker'), 'config.json');
  let config: {
    auths?: Record<string, { auth?: string; identitytoken?: string }>;
    credsStore?: string;
    credHelpers?: Record<string, string>;
  };
  try {
    config = JSON.parse(fs.readFileSync(file, 'utf8')) as typeof config;
  } catch {
    return undefined;
  }
  const keys = configKey(registry);
  const helper = keys.map((k) => config.credHelpers?.[k]).find(Boolean) ?? config.credsStore;
  if (helper) {
    const c = await credentialHelper(helper, registry, env);
    if (c) return c;
  }
  for (const k of keys) {
    const a = config.auths?.[k];
    if (a?.identitytoken) return { identityToken: a.identitytoken };
    if (a?.auth) {
      const decoded = Buffer.from(a.auth, 'base64').toString('utf8');
      const i = decoded.indexOf(':');
      if (i > 0) return { username: decoded.slice(0, i), password: decoded.slice(i + 1) };
    }
  }
  return undefined;
}

/** Options of the registry source. */
