/**
 * The QEMU backend boots the same kernel libkrun would: the raw image inside libkrunfw. QEMU's
 * `-kernel` does not take a raw image, but it boots an ELF whose notes carry a Xen PVH entry point.
 * The raw image already contains that note (XEN_ELFNOTE_PHYS32_ENTRY); this module finds it and
 * wraps the bytes in a minimal ELF64: one PT_LOAD at the firmware's load address and one PT_NOTE.
 * The result is cached by libkrunfw path, version and size.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MicrovmError } from '../../errors';
import { readFirmwareKernel, type FirmwareInfo } from '../../resolve/firmware';
import { withFileLock } from '../../state';

const XEN_ELFNOTE_PHYS32_ENTRY = 18;

/** Finds the PVH entry address in a raw kernel image (the "Xen" note of type 18). */
export function findPvhEntry(kernel: Buffer): number | undefined {
  const name = Buffer.from('Xen\0');
  for (let i = kernel.indexOf(name); i >= 12; i = kernel.indexOf(name, i + 1)) {
    const namesz = kernel.readUInt32LE(i - 12);
    const descsz = kernel.readUInt32LE(i - 8);
    const type = kernel.readUInt32LE(i - 4);
    if (namesz !== 4 || type !== XEN_ELFNOTE_PHYS32_ENTRY || (descsz !== 4 && descsz !== 8)) continue;
    if (i + 4 + descsz > kernel.length) continue;
    return kernel.readUInt32LE(i + 4); // the low 32 bits: a physical address below 4 GiB
  }
  return undefined;
}

/** Builds an ELF64 (x86-64, ET_EXEC) with the kernel as one PT_LOAD and a PVH entry note. */
export function buildPvhElf(kernel: Buffer, loadAddress: number, pvhEntry: number): Buffer {
  const ehsize = 64;
  const phentsize = 56;
  const phnum = 2;
  const note = Buffer.alloc(12 + 4 + 4);
  note.writeUInt32LE(4, 0); // namesz
  note.writeUInt32LE(4, 4); // descsz
  note.writeUInt32LE(XEN_ELFNOTE_PHYS32_ENTRY, 8);
  note.write('Xen\0', 12, 'latin1');
  note.writeUInt32LE(pvhEntry, 16);
  const noteOffset = ehsize + phentsize * phnum;
  const kernelOffset = Math.ceil((noteOffset + note.length) / 4096) * 4096; // page-aligned like the load address
  const header = Buffer.alloc(kernelOffset);

  // ELF header
  header.write('\x7fELF', 0, 'latin1');
  header[4] = 2; // ELFCLASS64
  header[5] = 1; // little endian
  header[6] = 1; // EV_CURRENT
  header.writeUInt16LE(2, 16); // ET_EXEC
  header.writeUInt16LE(62, 18); // EM_X86_64
  header.writeUInt32LE(1, 20); // version
  header.writeBigUInt64LE(BigInt(pvhEntry), 24); // e_entry (the PVH note is what QEMU uses)
  header.writeBigUInt64LE(BigInt(ehsize), 32); // e_phoff
  header.writeBigUInt64LE(0n, 40); // e_shoff
  header.writeUInt32LE(0, 48); // flags
  header.writeUInt16LE(ehsize, 52);
  header.writeUInt16LE(phentsize, 54);
  header.writeUInt16LE(phnum, 56);
  header.writeUInt16LE(64, 58); // e_shentsize
  header.writeUInt16LE(0, 60); // e_shnum
  header.writeUInt16LE(0, 62); // e_shstrndx

  // PT_LOAD: the kernel at its physical load address
  let ph = ehsize;
  header.writeUInt32LE(1, ph); // PT_LOAD
  header.writeUInt32LE(7, ph + 4); // RWX
  header.writeBigUInt64LE(BigInt(kernelOffset), ph + 8);
  header.writeBigUInt64LE(BigInt(loadAddress), ph + 16); // vaddr
  header.writeBigUInt64LE(BigInt(loadAddress), ph + 24); // paddr
  header.writeBigUInt64LE(BigInt(kernel.length), ph + 32); // filesz
  header.writeBigUInt64LE(BigInt(kernel.length), ph + 40); // memsz
  header.writeBigUInt64LE(4096n, ph + 48);

  // PT_NOTE: the PVH entry
  ph += phentsize;
  header.writeUInt32LE(4, ph); // PT_NOTE
  header.writeUInt32LE(4, ph + 4); // R
  header.writeBigUInt64LE(BigInt(noteOffset), ph + 8);
  header.writeBigUInt64LE(0n, ph + 16);
  header.writeBigUInt64LE(0n, ph + 24);
  header.writeBigUInt64LE(BigInt(note.length), ph + 32);
  header.writeBigUInt64LE(BigInt(note.length), ph + 40);
  header.writeBigUInt64LE(4n, ph + 48);
  note.copy(header, noteOffset);
  return Buffer.concat([header, kernel]);
}

/**
 * Returns the path of a bootable PVH ELF of the kernel in `firmware`, writing it under `cacheDir`
 * once (atomically) per libkrunfw path + version + size.
 */
export async function pvhKernelFor(firmware: FirmwareInfo, cacheDir: string): Promise<string> {
  const file = pvhKernelFile(firmware, cacheDir);
  if (fs.existsSync(file)) return file;
  // Built once however many starts ask at the same time: in this process one promise, across
  // processes a lock file beside it (whoever waited finds the file made).
  let building = BUILDING.get(file);
  if (!building) {
    building = (async () => {
      fs.mkdirSync(cacheDir, { recursive: true, mode: 0o755 });
      return withFileLock(`${file}.lock`, () => (fs.existsSync(file) ? file : buildPvhKernel(firmware, file)), 300_000);
    })().finally(() => BUILDING.delete(file));
    BUILDING.set(file, building);
  }
  return building;
}

const BUILDING = new Map<string, Promise<string>>();

function pvhKernelFile(firmware: FirmwareInfo, cacheDir: string): string {
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(firmware.path);
  } catch {
    /* a soname-only path: key by the reported facts alone */
  }
  const key = createHash('sha256')
    .update(`${firmware.path}\0${firmware.abiVersion}\0${firmware.kernelSize}\0${st?.size ?? ''}\0${st?.mtimeMs ?? ''}`)
    .digest('hex')
    .slice(0, 16);
  return path.join(cacheDir, `libkrunfw-${firmware.abiVersion}-${key}.elf`);
}

async function buildPvhKernel(firmware: FirmwareInfo, file: string): Promise<string> {
  const { kernel, loadAddress } = await readFirmwareKernel(firmware.path);
  const entry = findPvhEntry(kernel);
  if (entry === undefined) {
    throw new MicrovmError(
      'ERR_MICROVM_KERNEL_PVH',
      `The kernel in ${firmware.path} has no Xen PVH entry note; QEMU cannot boot it`,
    );
  }
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, buildPvhElf(kernel, loadAddress, entry), { mode: 0o644 });
  fs.renameSync(tmp, file);
  return file;
}
