/**
 * Backend registration: each backend file exports one BackendDefinition, listed in
 * `backendDefinitions` below. Adding a KMS means one file plus one line here.
 */
import type { z } from 'zod';
import type { BackendDefinition } from './definition.ts';
import { awsBackend } from './aws.ts';
import { azureBackend } from './azure.ts';
import { kmsPluginBackend } from './kms-plugin.ts';
import { localBackend } from './local.ts';
import { pkcs11Backend } from './pkcs11.ts';
import { vaultBackend } from './vault.ts';

export const backendDefinitions = [localBackend, vaultBackend, azureBackend, awsBackend, pkcs11Backend, kmsPluginBackend] as const;

export type BackendConfig = z.output<(typeof backendDefinitions)[number]['configSchema']>;

export function definitionFor(type: string): BackendDefinition | undefined {
  return (backendDefinitions as readonly BackendDefinition[]).find((d) => d.type === type);
}
