/**
 * The host <-> guest protocol is spelled once per language: lib/guest/protocol.ts and
 * native/guest/protocol.h hold the same values, and no other source file writes a port name or the
 * init's paths as a string literal of its own.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as p from '../lib/guest/protocol';

const root = path.join(__dirname, '..');
const header = fs.readFileSync(path.join(root, 'native', 'guest', 'protocol.h'), 'utf8');

/** The header's constants: name -> value (strings unquoted, numbers as numbers). */
function headerConstants(): Map<string, string | number> {
  const out = new Map<string, string | number>();
  for (const m of header.matchAll(/constexpr (?:char (k\w+)\[\] = "((?:[^"\\]|\\.)*)"|int (k\w+) = (\d+));/g)) {
    if (m[1]) out.set(m[1], m[2]);
    else out.set(m[3], Number(m[4]));
  }
  return out;
}

const EXPECTED: Record<string, string | number> = {
  kInitPath: p.GUEST_INIT_PATH,
  kConfigPath: p.GUEST_CONFIG_PATH,
  kConfigCmd: p.CONFIG_KEY.cmd,
  kConfigEnv: p.CONFIG_KEY.env,
  kConfigWorkingDir: p.CONFIG_KEY.workingDir,
  kConfigMounts: p.CONFIG_KEY.mounts,
  kConfigPorts: p.CONFIG_KEY.ports,
  kConfigHosts: p.CONFIG_KEY.hosts,
  kConfigUser: p.CONFIG_KEY.user,
  kArgIdle: p.INIT_ARG.idle,
  kArgAgentListen: p.INIT_ARG.agentListen,
  kPortExit: p.PORT.exit,
  kPortStdout: p.PORT.stdout,
  kPortStderr: p.PORT.stderr,
  kPortLogTimes: p.PORT.logTimes,
  kPortAgent: p.PORT.agent,
  kLineUp: p.EXIT_LINE.up,
  kLineMilestone: p.EXIT_LINE.milestone,
  kLineExit: p.EXIT_LINE.exit,
  kAgentVsockPort: p.AGENT_VSOCK_PORT,
  kConsolePrefix: p.CONSOLE_PREFIX,
  kPhraseCannotListen: p.AGENT_FAILURE_PHRASES[0],
  kPhraseBadAgent: p.AGENT_FAILURE_PHRASES[1],
  kPhraseCannotStartAgent: p.AGENT_FAILURE_PHRASES[2],
};

test('native/guest/protocol.h and lib/guest/protocol.ts hold the same protocol, constant for constant', () => {
  expect(Object.fromEntries(headerConstants())).toEqual(EXPECTED);
});

function files(dir: string, ext: RegExp): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const f = path.join(dir, e.name);
    return e.isDirectory() ? files(f, ext) : ext.test(e.name) ? [f] : [];
  });
}

test("no other source writes the protocol's port names or the init's paths as literals of its own", () => {
  const literals = [...Object.values(p.PORT), p.GUEST_INIT_PATH, p.GUEST_CONFIG_PATH];
  const offenders: string[] = [];
  for (const f of [...files(path.join(root, 'lib'), /\.ts$/), ...files(path.join(root, 'native'), /\.(cc|h)$/)]) {
    if (f.endsWith(path.join('guest', 'protocol.ts')) || f.endsWith(path.join('guest', 'protocol.h'))) continue;
    // Code only: comments may name the ports (they document them).
    const text = fs
      .readFileSync(f, 'utf8')
      .replace(/\/\*[\s\S]*?\*\//g, '')
      .replace(/(^|[^:])\/\/.*$/gm, '$1');
    for (const l of literals)
      for (const q of ['"', "'", '`'])
        if (text.includes(`${q}${l}${q}`)) offenders.push(`${path.relative(root, f)}: ${q}${l}${q}`);
  }
  expect(offenders).toEqual([]);
});
