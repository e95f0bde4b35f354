/**
 * Shared pieces of library search: the system library directories for this machine and the
 * record of every place tried (for errors that list them).
 */
import * as path from 'node:path';

/** Debian/Ubuntu multiarch triplet for this Node's architecture. */
export function multiarchTriplet(arch: string = process.arch): string | undefined {
  switch (arch) {
    case 'x64':
      return 'x86_64-linux-gnu';
    case 'arm64':
      return 'aarch64-linux-gnu';
    case 'riscv64':
      return 'riscv64-linux-gnu';
    case 's390x':
      return 's390x-linux-gnu';
    case 'ppc64':
      return 'powerpc64le-linux-gnu';
    default:
      return undefined;
  }
}

/** The usual system library directories, most specific first. */
export function systemLibraryDirs(arch: string = process.arch): string[] {
  const triplet = multiarchTriplet(arch);
  const dirs = ['/usr/local/lib64', '/usr/local/lib'];
  if (triplet) dirs.push(`/usr/local/lib/${triplet}`, `/usr/lib/${triplet}`, `/lib/${triplet}`);
  dirs.push('/usr/lib64', '/usr/lib', '/lib64', '/lib');
  return dirs;
}

/** One place a search looked, and what it found there. */
export interface SearchAttempt {
  /** Where it came from: "dir option", "MICROVM_LIBKRUN_DIR", "pkg-config", "system", ... */
  source: string;
  /** Path tried, or the bare soname for the dynamic loader's own search. */
  candidate: string;
  /** Why it was not used. */
  reason: string;
}

/** Renders attempts as indented lines for an error message. */
export function formatAttempts(attempts: SearchAttempt[]): string {
  return attempts.map((a) => `  - ${a.candidate} (${a.source}): ${a.reason}`).join('\n');
}

/** Splits a PATH-like variable into absolute directories (relative entries are ignored). */
export function splitDirs(value: string | undefined): string[] {
  if (!value) return [];
  return value.split(':').filter((d) => d.length > 0 && path.isAbsolute(d));
}
