/**
 * microvm.preflight.RunAll: runs checks in order, one microvm.preflight.Check span each, and
 * combines required failures into one ERR_MICROVM_PREFLIGHT error.
 */
import { MicrovmError } from '../errors';
import { ATTR, SPAN } from '../telemetry/attributes';
import { inSpan, type SpanScope } from '../telemetry/tracer';
import type { CheckResult, PreflightCheck } from './checks';

/** One failed check in an ERR_MICROVM_PREFLIGHT error. */
export interface PreflightFailure {
  name: string;
  required: boolean;
  message: string;
  remediation?: string;
}

/** ERR_MICROVM_PREFLIGHT: the required checks that failed (and the advisory ones), each with its fix. */
export class PreflightError extends MicrovmError {
  /** Every failed check, required or not, in the order they ran. */
  readonly failures: readonly PreflightFailure[];

  constructor(message: string, failures: readonly PreflightFailure[]) {
    super('ERR_MICROVM_PREFLIGHT', message);
    this.name = 'PreflightError';
    this.failures = failures;
  }
}

/** Runs `checks`; resolves with the advisory failures, rejects when a required one failed. */
export async function runAllChecks(
  scope: SpanScope,
  checks: readonly PreflightCheck[],
  signal?: AbortSignal,
): Promise<PreflightFailure[]> {
  return inSpan(
    scope,
    SPAN.PREFLIGHT_RUN_ALL,
    { [ATTR.PREFLIGHT_CHECK_COUNT]: checks.length },
    async (_span, inner) => {
      const failures: PreflightFailure[] = [];
      for (const check of checks) {
        signal?.throwIfAborted();
        const required = check.required !== false;
        await inSpan(
          inner,
          SPAN.PREFLIGHT_CHECK,
          { [ATTR.PREFLIGHT_CHECK_NAME]: check.name, [ATTR.PREFLIGHT_CHECK_REQUIRED]: required },
          async (span) => {
            let result: CheckResult;
            try {
              result = await check.run(signal);
            } catch (err) {
              result = { ok: false, message: `check threw: ${(err as Error).message}` };
            }
            span.setAttribute(ATTR.PREFLIGHT_CHECK_PASSED, result.ok);
            if (!result.ok) {
              failures.push({
                name: check.name,
                required,
                message: result.message ?? 'failed',
                remediation: result.remediation,
              });
              if (required)
                throw new MicrovmError('ERR_MICROVM_PREFLIGHT_CHECK', `${check.name}: ${result.message ?? 'failed'}`);
            }
          },
        ).catch((err: unknown) => {
          if ((err as MicrovmError).code !== 'ERR_MICROVM_PREFLIGHT_CHECK') throw err;
        });
      }
      const blocking = failures.filter((f) => f.required);
      if (blocking.length > 0) {
        const lines = blocking.map(
          (f) => `  - ${f.name}: ${f.message}${f.remediation ? `\n    fix: ${f.remediation}` : ''}`,
        );
        throw new PreflightError(`Preflight failed:\n${lines.join('\n')}`, failures);
      }
      return failures;
    },
  );
}
