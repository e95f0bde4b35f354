/** The package root works for CommonJS and ESM consumers, with type declarations. */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { packageRoot } from '../lib/native';
import { scratch } from './helpers';

const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { name: string };

/** Runs `code` in a consumer project whose node_modules/node-microvm links to this checkout. */
function consumer(file: string, code: string): string {
  const s = scratch('microvm-consumer-');
  try {
    fs.mkdirSync(path.join(s.dir, 'node_modules'));
    fs.symlinkSync(packageRoot, path.join(s.dir, 'node_modules', pkg.name));
    fs.writeFileSync(path.join(s.dir, file), code);
    return execFileSync(process.execPath, [path.join(s.dir, file)], { cwd: s.dir, encoding: 'utf8' });
  } finally {
    s.cleanup();
  }
}

describe('package entry points', () => {
  test('built output exists (npm ci runs the prepare script)', () => {
    for (const f of ['dist/index.js', 'dist/index.mjs', 'dist/index.d.ts', 'dist/index.d.mts']) {
      expect([f, fs.existsSync(path.join(packageRoot, f))]).toEqual([f, true]);
    }
  });

  test("require('node-microvm') from a CommonJS consumer", () => {
    const out = consumer(
      'c.cjs',
      `const m = require('node-microvm');
       console.log(JSON.stringify({ fw: typeof m.native.resolveFirmware, rt: typeof m.native.resolveRuntime, ctx: typeof m.KrunContext, err: typeof m.KrunError }));`,
    );
    expect(JSON.parse(out)).toEqual({ fw: 'function', rt: 'function', ctx: 'function', err: 'function' });
  });

  test('the library loads @opentelemetry/api only (a peer dependency); the SDK is for the CLI', () => {
    const out = consumer(
      'otel.cjs',
      `require('node-microvm');
       const loaded = Object.keys(require.cache).map((k) => /node_modules\\/(@opentelemetry\\/[^/]+)/.exec(k)?.[1]).filter(Boolean);
       console.log(JSON.stringify([...new Set(loaded)]));`,
    );
    expect(JSON.parse(out)).toEqual(['@opentelemetry/api']);
    const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as {
      dependencies: Record<string, string>;
      peerDependencies: Record<string, string>;
    };
    expect(pkg.peerDependencies['@opentelemetry/api']).toBe('^1.3.0');
    expect(pkg.dependencies['@opentelemetry/api']).toBeUndefined();
  });

  test('import from an ESM consumer (named and default)', () => {
    const out = consumer(
      'e.mjs',
      `import m, { native, KrunContext, resolveFirmware } from 'node-microvm';
       console.log(JSON.stringify({ same: m.native === native, ctx: typeof KrunContext, fw: typeof resolveFirmware }));`,
    );
    expect(JSON.parse(out)).toEqual({ same: true, ctx: 'function', fw: 'function' });
  });

  test('the firmware resolver works from the package root', () => {
    const dir = process.env.MICROVM_TEST_LIBKRUNFW_DIR as string;
    const out = consumer(
      'f.cjs',
      `require('node-microvm').native.resolveFirmware({ dir: ${JSON.stringify(dir)} }).then((fw) => console.log(JSON.stringify(fw)));`,
    );
    expect(JSON.parse(out)).toMatchObject({ abiVersion: 5, path: path.join(dir, 'libkrunfw.so.5') });
  });

  test('type declarations cover the public API', () => {
    const dts = fs.readFileSync(path.join(packageRoot, 'dist', 'index.d.ts'), 'utf8');
    for (const name of [
      'native',
      'KrunContext',
      'KrunError',
      'resolveFirmware',
      'resolveRuntime',
      'startRunner',
      'buildLaunchPlan',
    ]) {
      expect(dts).toContain(name);
    }
  });
});

describe('public exports', () => {
  test('the export list is pinned (a layout change must not add or drop one by accident)', () => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const m = require('../dist/index.js') as Record<string, unknown> & { native: Record<string, unknown> };
    expect(Object.keys(m).sort()).toEqual([
      'ATTR',
      'AgentClient',
      'AgentProcess',
      'ERROR_CODES',
      'EVENT',
      'FIRMWARE_INSTALL_HINT',
      'GuestError',
      'KrunContext',
      'KrunError',
      'KrunFeature',
      'LIBKRUNFW_ABI_VERSION',
      'LIBKRUNFW_SONAME',
      'LIBKRUN_SONAME',
      'LOG_LEVELS',
      'MicroVM',
      'MicrovmError',
      'PreflightError',
      'RunnerExit',
      'SPAN',
      'SshClient',
      'buildLaunchPlan',
      'buildPvhElf',
      'chooseBackend',
      'cloneRootfs',
      'decideAccel',
      'defaultCacheDir',
      'defaultDataRoot',
      'describeExit',
      'diskSpaceCheck',
      'errnoName',
      'evictImages',
      'findPvhEntry',
      'formatSpanTree',
      'gcImages',
      'generateKeyPair',
      'hooks',
      'hostPlatform',
      'image',
      'kvmCheck',
      'libkrunBackend',
      'listImages',
      'loadKeyPair',
      'memoryCheck',
      'native',
      'parseReference',
      'portsCheck',
      'probeKvm',
      'pruneVms',
      'pull',
      'purgeImages',
      'qemuBackend',
      'readFirmwareKernel',
      'readKvmVerdict',
      'resolveFirmware',
      'resolveQemuRuntime',
      'resolveRunner',
      'resolveRuntime',
      'resourcesCheck',
      'run',
      'serializeLaunchPlan',
      'startRunner',
      'systemClock',
      'userNamespacesCheck',
      'validateLaunchPlan',
      'waitForReady',
      'writeKeyPair',
    ]);
    expect(Object.keys(m.native).sort()).toEqual([
      'KrunContext',
      'KrunFeature',
      'addonPath',
      'buildLaunchPlan',
      'errnoName',
      'readFirmwareKernel',
      'resolveFirmware',
      'resolveRunner',
      'resolveRuntime',
      'serializeLaunchPlan',
      'startRunner',
      'validateLaunchPlan',
    ]);
  });
});

describe('published declarations', () => {
  test('compile with skipLibCheck: false in a strict app that installed only the packed package (and @types/node)', () => {
    const s = scratch('microvm-dts-');
    try {
      const tgz = execFileSync('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', s.dir], {
        cwd: packageRoot,
        encoding: 'utf8',
      })
        .trim()
        .split('\n')
        .pop() as string;
      const app = path.join(s.dir, 'app');
      fs.mkdirSync(app);
      fs.writeFileSync(path.join(app, 'package.json'), '{"name":"app","private":true}\n');
      const typesNode = (
        JSON.parse(
          fs.readFileSync(path.join(packageRoot, 'node_modules', '@types', 'node', 'package.json'), 'utf8'),
        ) as { version: string }
      ).version;
      execFileSync(
        'npm',
        [
          'install',
          '--ignore-scripts',
          '--no-audit',
          '--no-fund',
          '--silent',
          path.join(s.dir, tgz),
          `@types/node@${typesNode}`,
        ],
        { cwd: app, stdio: 'pipe' },
      );
      fs.writeFileSync(
        path.join(app, 'tsconfig.json'),
        JSON.stringify({
          compilerOptions: {
            strict: true,
            skipLibCheck: false,
            noEmit: true,
            target: 'ES2022',
            module: 'nodenext',
            moduleResolution: 'nodenext',
            lib: ['ES2023', 'ESNext.Disposable'],
            types: ['node'],
          },
          files: ['main.ts'],
        }),
      );
      fs.writeFileSync(
        path.join(app, 'main.ts'),
        `import { run, qemuBackend, type VmExit, type ExecChannel, SshClient, native, image, MicrovmError,
  type MicrovmErrorCode, PreflightError, type PostBootHook, type SpanScope } from 'node-microvm';
const hook: PostBootHook = (vm, scope: SpanScope) => void scope.tracer.startSpan(vm.name, undefined, scope.ctx).end();
export async function f(): Promise<VmExit> {
  await image.pull('busybox'); // cacheDir has a default
  const vm = await run('busybox', { backend: qemuBackend({ accel: 'tcg' }), timeouts: { boot: 1000 }, postBoot: [hook] });
  vm.on('exit', (e) => console.log(e.reason === 'exited' ? e.exitCode : e.signal));
  const ch: ExecChannel | undefined = vm.ssh ? await vm.ssh.spawn('true') : undefined;
  ch?.stderr.resume();
  void SshClient; void native.resolveFirmware;
  return vm.wait();
}
export function g(err: unknown): string {
  if (err instanceof PreflightError) return err.failures.map((x) => \`\${x.name}: \${x.remediation ?? ''}\`).join();
  if (err instanceof MicrovmError) {
    const code: MicrovmErrorCode | \`E\${string}\` = err.code;
    if (code === 'ERR_MICROVM_BOOT_TIMEOUT') return 'slow';
  }
  return '';
}
`,
      );
      const tsc = require.resolve('typescript/bin/tsc', { paths: [packageRoot] });
      const r = spawnSync(process.execPath, [tsc, '-p', app], { encoding: 'utf8' });
      expect(r.stdout + r.stderr).toBe('');
      expect(r.status).toBe(0);
    } finally {
      s.cleanup();
    }
  }, 180_000);
});

describe('the packed package', () => {
  test('npm pack ships prebuilds (addon, runner, guest init, fs guard), docs and LICENSE; npm i on a machine with no compiler uses them', () => {
    const s = scratch('microvm-pack-');
    try {
      // Pack a copy of the checkout: prepack rebuilds build/ there, never under the running tests.
      const src = path.join(s.dir, 'src');
      fs.mkdirSync(src);
      for (const e of fs.readdirSync(packageRoot)) {
        if (
          [
            'node_modules',
            'build',
            'build-cmake',
            'prebuilds',
            'dist',
            '.test-artifacts',
            '.git',
            'vendor',
            '.stryker-tmp',
            'reports',
          ].includes(e)
        )
          continue;
        fs.cpSync(path.join(packageRoot, e), path.join(src, e), { recursive: true });
      }
      fs.symlinkSync(path.join(packageRoot, 'node_modules'), path.join(src, 'node_modules'));
      const tgz = execFileSync('npm', ['pack', '--silent', '--pack-destination', s.dir], {
        cwd: src,
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
      })
        .trim()
        .split('\n')
        .pop() as string;
      const listing = execFileSync('tar', ['tzf', path.join(s.dir, tgz)], { encoding: 'utf8' }).split('\n');
      for (const f of [
        'package/prebuilds/linux-x64/node-microvm.node',
        'package/prebuilds/linux-x64/microvm-runner',
        'package/prebuilds/linux-x64/microvm-guest-init',
        'package/prebuilds/linux-x64/microvm-fsguard.so',
        'package/prebuilds/linux-x64/microvm-netguard.so',
        'package/LICENSE',
        'package/docs/api.md',
        'package/dist/index.js',
      ]) {
        expect([f, listing.includes(f)]).toEqual([f, true]);
      }
      expect(listing.some((f) => f.startsWith('package/build/'))).toBe(false);
      // An app on a machine without a compiler: PATH has node and sh only (no cc, c++, make, python3).
      const bin = path.join(s.dir, 'bin');
      fs.mkdirSync(bin);
      fs.symlinkSync(process.execPath, path.join(bin, 'node'));
      fs.symlinkSync('/bin/sh', path.join(bin, 'sh'));
      const npmCli = path.resolve(
        path.dirname(process.execPath),
        '..',
        'lib',
        'node_modules',
        'npm',
        'bin',
        'npm-cli.js',
      );
      const app = path.join(s.dir, 'app');
      fs.mkdirSync(app);
      fs.writeFileSync(path.join(app, 'package.json'), '{"name":"app","private":true}\n');
      const install = spawnSync(
        process.execPath,
        [npmCli, 'install', '--no-audit', '--no-fund', '--foreground-scripts', path.join(s.dir, tgz)],
        {
          cwd: app,
          encoding: 'utf8',
          env: { ...process.env, PATH: bin, npm_config_cache: path.join(os.homedir(), '.npm') },
        },
      );
      // ssh2's optional cpu-features tries a build and fails harmlessly without a compiler; our own
      // install script must not build: it found the prebuild.
      expect([
        install.status,
        /node-microvm[^\n]*(gyp|native-build)|native-build: /.test(install.stdout + install.stderr),
      ]).toEqual([0, false]);
      expect(install.stdout + install.stderr).toContain('node-microvm: using prebuilds/linux-x64/');
      const installed = path.join(app, 'node_modules', 'node-microvm');
      expect(fs.existsSync(path.join(installed, 'build'))).toBe(false);
      const out = execFileSync(
        process.execPath,
        [
          '-e',
          "const m = require('node-microvm'); console.log(m.native.addonPath()); console.log(m.native.resolveRunner())",
        ],
        { cwd: app, encoding: 'utf8' },
      ).split('\n');
      expect(out[0]).toBe(path.join(installed, 'prebuilds', 'linux-x64', 'node-microvm.node'));
      expect(out[1]).toBe(path.join(installed, 'prebuilds', 'linux-x64', 'microvm-runner'));
      // Of OpenTelemetry, the app got the API alone (the peer), and the CLI's --trace works with it.
      const otel = fs.readdirSync(path.join(app, 'node_modules', '@opentelemetry'));
      expect(otel).toEqual(['api']);
      const traced = spawnSync(
        process.execPath,
        [path.join(installed, 'bin', 'microvm.js'), 'run', `oci:${path.join(s.dir, 'no-such-layout')}:x`, '--trace'],
        { cwd: app, encoding: 'utf8', env: { ...process.env, MICROVM_DATA_DIR: path.join(s.dir, 'data') } },
      );
      expect(traced.status).toBe(1);
      expect(traced.stderr).toMatch(/^microvm\.Run +\d+\.\d{3} s {2}ERROR/m);
      expect(traced.stderr).toMatch(/^ {2}microvm\.Preflight +\d+\.\d{3} s/m);
    } finally {
      s.cleanup();
    }
  }, 600_000);

  test('no usable binary: the load error names `npm rebuild node-microvm`', () => {
    const s = scratch('microvm-nobin-');
    try {
      const pkgDir = path.join(s.dir, 'node_modules', 'node-microvm');
      fs.mkdirSync(pkgDir, { recursive: true });
      fs.cpSync(path.join(packageRoot, 'dist'), path.join(pkgDir, 'dist'), { recursive: true });
      fs.copyFileSync(path.join(packageRoot, 'package.json'), path.join(pkgDir, 'package.json'));
      fs.symlinkSync(path.join(packageRoot, 'node_modules'), path.join(pkgDir, 'node_modules'));
      const r = spawnSync(
        process.execPath,
        ['-e', "try { require('node-microvm').errnoName(22) } catch (e) { console.log(e.code + ' ' + e.message) }"],
        { cwd: s.dir, encoding: 'utf8' },
      );
      expect(r.stdout).toMatch(/^ERR_MICROVM_ADDON_LOAD Cannot load the node-microvm native addon/);
      expect(r.stdout).toContain('`npm rebuild node-microvm`');
    } finally {
      s.cleanup();
    }
  });
});
