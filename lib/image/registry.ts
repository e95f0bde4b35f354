/**
 * Registry source: not implemented yet (issue 3 continues). Registry references fail with a
 * coded error that says how to pull offline instead.
 */
import { MicrovmError } from '../errors';
import type { Platform } from './oci';
import type { ResolvedImage } from './source';

export async function resolveRegistryImage(
  ref: { canonical: string },
  _platform: Platform,
  _options: { insecureRegistries?: string[]; signal?: AbortSignal },
): Promise<ResolvedImage> {
  throw new MicrovmError(
    'ERR_MICROVM_IMAGE_PULL_UNAVAILABLE',
    `Pulling ${ref.canonical} from a registry is not implemented yet; use an OCI layout (skopeo copy docker://${ref.canonical} oci:DIR:TAG, then oci:DIR:TAG) or rootfsPath.`,
  );
}
