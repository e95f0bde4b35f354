/**
 * The `microvm` command line. Exit codes: the guest command's own code for `run -- CMD` (and for
 * `exec`), 128+N after signal N (an interrupted `run`, or a VM stopped by a signal), 1 with a coded
 * message when the hypervisor failed; otherwise 0 success, 1 failure (the message carries the error
 * code), 2 usage error.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { defaultCacheDir, defaultDataRoot } from '../paths';
import { asNoSpace } from '../errors';
import { packageRoot } from '../native';
import { cmdCp, cmdExec } from './agent-commands';
import { cmdBench } from './bench';
import { type CommandContext, commandFirst, parseCommand, UsageError, usageCode } from './common';
import { cmdDoctor, cmdSetup } from './doctor';
import { cmdCache, cmdImages, cmdPrune, cmdPull } from './images';
import { cmdRun } from './run';
import { USAGE } from './usage';
import { cmdInspect, cmdLogs, cmdPauseOrUnpause, cmdPort, cmdPs, cmdStats, cmdStopOrRm } from './vms';

/** Every command, by name; each resolves to the exit code. */
const COMMANDS: Record<string, (c: CommandContext) => Promise<number>> = {
  run: cmdRun,
  pull: cmdPull,
  images: cmdImages,
  cache: cmdCache,
  prune: cmdPrune,
  ps: cmdPs,
  inspect: cmdInspect,
  port: cmdPort,
  logs: cmdLogs,
  stop: cmdStopOrRm,
  rm: cmdStopOrRm,
  pause: cmdPauseOrUnpause,
  unpause: cmdPauseOrUnpause,
  stats: cmdStats,
  exec: cmdExec,
  cp: cmdCp,
  doctor: cmdDoctor,
  setup: cmdSetup,
  bench: cmdBench,
};

/** Runs the CLI; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const argv = commandFirst(args);
  const command = argv[0] ?? '';
  const rest = argv.slice(1);
  const ours = rest.indexOf('--') >= 0 ? rest.slice(0, rest.indexOf('--')) : rest;
  const json = ours.includes('--json');
  const out = (o: unknown, text: string): void => {
    process.stdout.write(json ? `${JSON.stringify(o)}\n` : text ? `${text}\n` : '');
  };
  if (command === '--version' || command === '-V' || command === 'version') {
    const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { version: string };
    out({ version: pkg.version, node: process.versions.node }, pkg.version);
    return 0;
  }
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${USAGE['']}\n`);
    return command ? 0 : 2;
  }
  if (ours.includes('--help')) {
    process.stdout.write(`${USAGE[command] ?? USAGE['']}\n`);
    return 0;
  }
  let values: Record<string, string | boolean | string[] | undefined> = {};
  let positional: string[] = [];
  let after: string[] = [];
  if (command !== 'run' && command !== 'bench') {
    try {
      ({ values, positionals: positional, after } = parseCommand(command, rest));
    } catch (err) {
      process.stderr.write(
        `microvm: [${usageCode(err)}] ${(err as Error).message}\nRun 'microvm ${command} --help'.\n`,
      );
      return 2;
    }
  } else {
    // run and bench parse everything themselves; the data dir is read the same way.
    const m = /^--data-dir(?:=(.*))?$/;
    ours.forEach((a, i) => {
      const hit = m.exec(a);
      if (hit) values['data-dir'] = hit[1] ?? ours[i + 1];
    });
  }
  const dataDir =
    typeof values['data-dir'] === 'string' && values['data-dir'] ? path.resolve(values['data-dir']) : defaultDataRoot();
  const cacheDir = defaultCacheDir(dataDir);
  const ctx: CommandContext = { command, args: rest, values, positional, after, dataDir, cacheDir, json, out };
  try {
    const cmd = Object.hasOwn(COMMANDS, command) ? COMMANDS[command] : undefined;
    if (!cmd) throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    return await cmd(ctx);
  } catch (err) {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith?.('ERR_PARSE_ARGS')) {
      if (json)
        process.stdout.write(
          `${JSON.stringify({ error: { code: usageCode(err), message: (err as Error).message } })}\n`,
        );
      process.stderr.write(
        `microvm: [${usageCode(err)}] ${(err as Error).message}\nRun 'microvm ${command} --help'.\n`,
      );
      return 2;
    }
    const e = asNoSpace(err, `microvm ${command}`) as Error & { code?: string };
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: e.code ?? e.name, message: e.message } })}\n`);
    else process.stderr.write(`microvm: ${e.code ? `[${e.code}] ` : ''}${e.message}\n`);
    return 1;
  }
}
