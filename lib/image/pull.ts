/**
 * Stage microvm.ImagePull. Registry pulls, the content-addressed cache and layer extraction are
 * the image issue's work (#3); until they land, run() takes an already unpacked tree through
 * `rootfsPath` (and optionally its runtime config through `imageConfig`), and this stage records
 * that as the source.
 */
import * as fs from 'node:fs';
import type { ImageRuntimeConfig } from '../backends/types';
import { MicrovmError } from '../errors';
import { ATTR } from '../telemetry/attributes';
import type { Span } from '@opentelemetry/api';

/** The result of the image stage: an unpacked root tree and its runtime config. */
export interface PulledImage {
  rootfsDir: string;
  config: ImageRuntimeConfig;
  source: 'rootfsPath';
}

export const EMPTY_IMAGE_CONFIG: ImageRuntimeConfig = { entrypoint: [], cmd: [], env: [], workingDir: '' };

/** Resolves the image for run(): today only a given rootfsPath. */
export function resolveImage(image: string, rootfsPath: string | undefined, config: Partial<ImageRuntimeConfig> | undefined, span: Span): PulledImage {
  if (rootfsPath === undefined) {
    throw new MicrovmError(
      'ERR_MICROVM_IMAGE_PULL_UNAVAILABLE',
      `Pulling ${image} is not implemented yet; pass rootfsPath (an unpacked root filesystem directory).`,
    );
  }
  let st: fs.Stats;
  try {
    st = fs.statSync(rootfsPath);
  } catch (err) {
    throw new MicrovmError('ERR_MICROVM_ROOTFS_NOT_FOUND', `rootfsPath ${rootfsPath} does not exist`, { cause: err });
  }
  if (!st.isDirectory()) throw new MicrovmError('ERR_MICROVM_ROOTFS_NOT_FOUND', `rootfsPath ${rootfsPath} is not a directory`);
  span.setAttribute(ATTR.IMAGE_SOURCE, 'rootfsPath');
  span.setAttribute(ATTR.IMAGE_CACHE_HIT, true);
  return { rootfsDir: rootfsPath, config: { ...EMPTY_IMAGE_CONFIG, ...config }, source: 'rootfsPath' };
}
