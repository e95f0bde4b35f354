/**
 * SSH key pairs for reaching the guest: ed25519 (default) or ECDSA P-256, in OpenSSH format,
 * written with 0600 permissions. Private keys never appear in errors, logs or spans.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MicrovmError } from '../errors';
import { ssh2 } from './lazy';
import * as v from '../validate';

/** A key pair: the private key (OpenSSH PEM) and the `authorized_keys` line. */
export interface SshKeyPair {
  type: 'ed25519' | 'ecdsa';
  privateKey: string;
  publicKey: string;
}

/** Generates a key pair (`ed25519` ~2 ms, `ecdsa` P-256 ~1 ms). */
export function generateKeyPair(options: { type?: 'ed25519' | 'ecdsa'; comment?: string } = {}): SshKeyPair {
  const o = v.object('options', options);
  v.knownKeys('options', o, ['type', 'comment']);
  const type = o.type === undefined ? 'ed25519' : o.type;
  if (type !== 'ed25519' && type !== 'ecdsa')
    throw v.rangeError(`Expected 'ed25519' or 'ecdsa' for type but received ${v.describe(type)}`);
  const comment = o.comment === undefined ? 'node-microvm' : v.string('comment', o.comment);
  // ssh2 (1.17) writes an ed25519 key whose public half starts with a 0x00 byte with that byte
  // dropped (a 31-byte key): neither ssh2 nor OpenSSH can read it back ("Malformed OpenSSH private
  // key"), 1 key in 256. Such a key is generated again; 8 bad keys in a row has odds of 2^-64.
  for (let attempt = 0; attempt < 8; attempt++) {
    const pair =
      type === 'ed25519'
        ? ssh2().utils.generateKeyPairSync('ed25519', { comment })
        : ssh2().utils.generateKeyPairSync('ecdsa', { bits: 256, comment });
    if (!(ssh2().utils.parseKey(pair.private) instanceof Error))
      return { type, privateKey: pair.private, publicKey: pair.public.trim() };
  }
  throw new MicrovmError('ERR_MICROVM_SSH_KEY', `Could not generate a readable ${type} key pair`);
}

/** Writes `<dir>/<name>` (0600) and `<dir>/<name>.pub` (0644), atomically; returns their paths. */
export function writeKeyPair(
  pair: SshKeyPair,
  dir: string,
  name = `id_${pair.type}`,
): { privateKeyPath: string; publicKeyPath: string } {
  v.absolutePath('dir', dir);
  if (!/^[A-Za-z0-9_.-]+$/.test(name))
    throw v.rangeError(`Expected a plain file name for name but received ${v.describe(name)}`);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const privateKeyPath = path.join(dir, name);
  const publicKeyPath = `${privateKeyPath}.pub`;
  const write = (file: string, data: string, mode: number): void => {
    const tmp = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, data, { mode, flag: 'wx' });
    fs.chmodSync(tmp, mode);
    fs.renameSync(tmp, file);
  };
  write(privateKeyPath, pair.privateKey.endsWith('\n') ? pair.privateKey : `${pair.privateKey}\n`, 0o600);
  write(publicKeyPath, `${pair.publicKey}\n`, 0o644);
  return { privateKeyPath, publicKeyPath };
}

/** Loads a private key file (OpenSSH or PEM) and derives its public key line. */
export function loadKeyPair(privateKeyPath: string, passphrase?: string): SshKeyPair {
  v.absolutePath('privateKeyPath', privateKeyPath);
  const text = fs.readFileSync(privateKeyPath, 'utf8');
  const parsed = ssh2().utils.parseKey(text, passphrase);
  if (parsed instanceof Error || Array.isArray(parsed)) {
    // The parser's message never contains key material; the file path is enough to act on.
    throw new MicrovmError(
      'ERR_MICROVM_SSH_KEY',
      `Cannot read the private key in ${privateKeyPath}: ${parsed instanceof Error ? parsed.message : 'several keys in one file'}`,
    );
  }
  const type = parsed.type === 'ssh-ed25519' ? 'ed25519' : parsed.type.startsWith('ecdsa-') ? 'ecdsa' : undefined;
  if (!type)
    throw new MicrovmError('ERR_MICROVM_SSH_KEY', `${privateKeyPath} holds a ${parsed.type} key; use ed25519 or ECDSA`);
  return {
    type,
    privateKey: text,
    publicKey: `${parsed.type} ${parsed.getPublicSSH().toString('base64')}${parsed.comment ? ` ${parsed.comment}` : ''}`,
  };
}
