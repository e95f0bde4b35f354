import { addon } from '../native';
import * as v from '../validate';

/**
 * The errno name the native side uses for an errno number (`22` or `-22` → `"EINVAL"`), the same
 * table that names {@link KrunError} codes; `"EUNKNOWN"` when it has no name.
 */
export function errnoName(errno: number): string {
  const n = v.integer('errno', errno, -4095, 4095);
  return addon().errnoName(Math.abs(n));
}
