/**
 * Stage microvm.NetworkStart. By default libkrun's TSI (transparent socket impersonation) carries
 * the guest's sockets and the port map forwards host ports: nothing to start. A NetworkProvider
 * (passt, gvproxy, ...) can replace it with a virtio-net device behind a unix socket without any
 * change to the pipeline.
 */

/** A started network provider. */
export interface NetworkHandle {
  /** unixstream (passt, socket_vmnet) or unixgram (gvproxy, vmnet-helper). */
  kind: 'unixstream' | 'unixgram';
  /** The provider's socket. */
  socketPath: string;
  /** The guest NIC's MAC address. */
  mac: string;
  /** Stops the provider. Idempotent. */
  stop(): Promise<void>;
}

/** Pluggable network: started before the VM, stopped after it. */
export interface NetworkProvider {
  readonly name: string;
  start(input: {
    vmId: string;
    dataDir: string;
    ports: { host: number; guest: number }[];
    signal?: AbortSignal;
  }): Promise<NetworkHandle>;
}
