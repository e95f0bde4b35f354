/**
 * Reading what a QEMU VM left: the exit port's lines, QEMU's and the console's last lines for an
 * error message, whether the root lacks a resolver, and slirp's view of a forwarded connection.
 * All of it may come from the guest: capped and parsed strictly.
 */

import * as fs from 'node:fs';

import * as path from 'node:path';

import { EXIT_LINE } from '../../guest/protocol';
import type { BackendStartInput } from '../types';

import { readTail } from '../../file-tail';

import { guestLines } from '../../guest/text';

/** The last `max` bytes of a file as text ('' when it cannot be read). */
export function tail(file: string, max = 4000): string {
  return readTail(file, max)?.toString('utf8') ?? '';
}

/**
 * QEMU's and the console's telling lines, for an error message: the error lines first (a KVM
 * failure is followed by a register dump), then the last lines. Guest text is shown, never trusted.
 */
export function lastLines(input: Pick<BackendStartInput, 'logPath' | 'consoleLogPath'>): string {
  const lines = (t: string): string[] => guestLines(t, Infinity);
  const show = (ls: string[]): string => ls.map((l) => `  ${l}`).join('\n');
  const log = lines(tail(input.logPath, 16000));
  const errors = log
    .filter((l) => /error|Assertion|failed|panic|terminating/i.test(l) && !/^virtio_/.test(l))
    .slice(-6);
  const rest = log.slice(-8).filter((l) => !errors.includes(l));
  const con = lines(tail(input.consoleLogPath, 2000)).slice(-8);
  return `${log.length ? `\nQEMU (${input.logPath}):\n${show([...errors, ...(rest.length ? ['...', ...rest] : [])])}` : ''}${con.length ? `\nconsole (${input.consoleLogPath}):\n${show(con)}` : ''}`;
}

/** What the guest said on the microvm.exit port: "UP", then "EXIT <code>". Hostile input: capped, strict. */
export function readExitPort(text: string): { up: boolean; code?: number } {
  const lines = text.slice(0, 4096).split('\n');
  const up = lines.includes(EXIT_LINE.up);
  for (const l of lines) {
    const m = l.startsWith(`${EXIT_LINE.exit} `) ? /^\S+ (\d{1,3})$/.exec(l) : null;
    if (m && Number(m[1]) <= 255) return { up: true, code: Number(m[1]) };
  }
  return { up };
}

/**
 * Whether the cloned root has no /etc/resolv.conf, or an empty regular file there: the top layer
 * that has the entry decides. An /etc or resolv.conf that is a symlink (or anything but a directory
 * and a regular file) is the image's business: false. Nothing is followed.
 */
export function resolverMissing(rootfs: { writableDir: string; sourceDir: string }): boolean {
  const lstat = (p: string): fs.Stats | undefined => {
    try {
      return fs.lstatSync(p);
    } catch {
      return undefined;
    }
  };
  for (const base of new Set([rootfs.writableDir, rootfs.sourceDir])) {
    const etc = lstat(path.join(base, 'etc'));
    if (!etc) continue;
    if (!etc.isDirectory()) return false;
    const file = lstat(path.join(base, 'etc', 'resolv.conf'));
    if (!file) continue;
    return file.isFile() && file.size === 0;
  }
  return true;
}

/**
 * The guest side of connections through the forward of `hostPort`, from QEMU's `info usernet`
 * table ("TCP[ESTABLISHED]  FD  127.0.0.1 HOST-PORT  10.0.2.15 GUEST-PORT ..."; slirp names each
 * forwarded connection by the forward's own address, not the client's): 'ESTABLISHED' when one
 * is, else the state of a pending one ('SYN_SENT', ...), else undefined.
 */
export function usernetState(table: string, hostPort: number): string | undefined {
  let pending: string | undefined;
  for (const line of table.split('\n')) {
    const m = /^\s*TCP\[([A-Z_0-9]+)\]\s+\d+\s+\S+\s+(\d+)\s/.exec(line);
    if (!m || Number(m[2]) !== hostPort) continue;
    if (m[1] === 'ESTABLISHED') return m[1];
    if (m[1] !== 'HOST_FORWARD' && m[1] !== 'TIME_WAIT' && m[1] !== 'CLOSED') pending ??= m[1];
  }
  return pending;
}
