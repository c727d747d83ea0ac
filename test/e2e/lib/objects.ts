/**
 * The Secrets and ConfigMaps the scenarios write, and how they are checked: each holds
 * random bytes plus a marker unique to it, so a read can be compared byte for byte and
 * a raw etcd value can be searched for the plaintext.
 */
import { randomBytes } from 'node:crypto';
import type { KubeClient } from './kube-client.ts';

export type Kind = 'secrets' | 'configmaps';

export interface Written {
  kind: Kind;
  namespace: string;
  name: string;
  /** Text that is in the object's data and must never appear in etcd. */
  marker: string;
  /** The `data` (and for ConfigMaps `binaryData`) sent, as the API returns them. */
  data: Record<string, string>;
  binaryData?: Record<string, string>;
}

/** Sizes cycled through: from one byte to 60 KiB of random data. */
const SIZES = [1, 100, 1000, 10_000, 60_000];

export function newSecret(namespace: string, name: string, index: number, size = SIZES[index % SIZES.length]!): Written {
  const marker = `plaintext-marker-${randomBytes(12).toString('hex')}`;
  const payload = Buffer.concat([randomBytes(size), Buffer.from(marker)]);
  return { kind: 'secrets', namespace, name, marker, data: { payload: payload.toString('base64'), marker: Buffer.from(marker).toString('base64') } };
}

export function newConfigMap(namespace: string, name: string, index: number): Written {
  const marker = `plaintext-marker-${randomBytes(12).toString('hex')}`;
  const size = SIZES[index % SIZES.length]!;
  return {
    kind: 'configmaps', namespace, name, marker,
    data: { note: `${marker} ${randomBytes(Math.ceil(size / 2)).toString('hex')}` },
    binaryData: { blob: randomBytes(size).toString('base64') },
  };
}

function body(object: Written): unknown {
  const metadata = { name: object.name, namespace: object.namespace };
  return object.kind === 'secrets'
    ? { apiVersion: 'v1', kind: 'Secret', metadata, type: 'Opaque', data: object.data }
    : { apiVersion: 'v1', kind: 'ConfigMap', metadata, data: object.data, binaryData: object.binaryData };
}

export function objectPath(object: Pick<Written, 'kind' | 'namespace' | 'name'>): string {
  return `/api/v1/namespaces/${object.namespace}/${object.kind}/${object.name}`;
}

/** The etcd key the apiserver stores it under. */
export function etcdKey(prefix: string, object: Pick<Written, 'kind' | 'namespace' | 'name'>): string {
  return `${prefix}/${object.kind}/${object.namespace}/${object.name}`;
}

export async function create(api: KubeClient, object: Written): Promise<void> {
  await api.json('POST', `/api/v1/namespaces/${object.namespace}/${object.kind}`, body(object));
}

interface StoredBody {
  data?: Record<string, string>;
  binaryData?: Record<string, string>;
}

/** True when what the API returns is exactly what was written. */
export function sameContent(object: Written, stored: StoredBody): boolean {
  const same = (a: Record<string, string> | undefined, b: Record<string, string> | undefined) =>
    JSON.stringify(Object.entries(a ?? {}).sort()) === JSON.stringify(Object.entries(b ?? {}).sort());
  return same(object.data, stored.data) && same(object.binaryData, stored.binaryData);
}

/** Reads it back; resolves with a reason when it differs or fails, undefined when exact. */
export async function readBack(api: KubeClient, object: Written): Promise<string | undefined> {
  try {
    const stored = await api.json<StoredBody>('GET', objectPath(object));
    return sameContent(object, stored) ? undefined : `${object.namespace}/${object.name}: content differs`;
  } catch (error) {
    return `${object.namespace}/${object.name}: ${(error as Error).message}`;
  }
}

export async function ensureNamespace(api: KubeClient, name: string): Promise<void> {
  const response = await api.request('POST', '/api/v1/namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name } });
  if (response.status !== 201 && response.status !== 409) throw new Error(`creating namespace ${name}: HTTP ${response.status} ${response.text.slice(0, 200)}`);
}
