/**
 * `trousseau pkcs11-keygen`: generate the backend's AES-256 key on a token, inside
 * the token, with the attributes of policies/pkcs11/key-template.json (sensitive,
 * never extractable, encrypt and decrypt only). For first installs and tests; an HSM
 * with its own key ceremony can create the key with its tools instead, as long as
 * the key passes the same policy (the backend checks it at every login).
 */
import path from 'node:path';
import type { Command } from 'commander';

export function registerPkcs11KeygenCommand(program: Command): void {
  program
    .command('pkcs11-keygen')
    .description('generate an AES-256 key for the pkcs11 backend on a PKCS#11 token (never extractable; encrypt and decrypt only)')
    .requiredOption('--module <file>', 'PKCS#11 module (shared library) of the token')
    .option('--token-label <label>', 'label of the token (or --slot)')
    .option('--slot <number>', 'slot number of the token (or --token-label)')
    .requiredOption('--pin-file <file>', 'file (mode 0600) holding the user PIN')
    .requiredOption('--label <label>', 'CKA_LABEL of the new key; rotation uses a new label')
    .option('--id <hex>', 'CKA_ID of the new key (default: 8 random bytes)')
    .action(async (options: { module: string; tokenLabel?: string; slot?: string; pinFile: string; label: string; id?: string }) => {
      if ((options.tokenLabel === undefined) === (options.slot === undefined)) throw new Error('give exactly one of --token-label and --slot');
      if (options.slot !== undefined && !/^\d{1,15}$/.test(options.slot)) throw new Error('--slot must be a slot number');
      if (!/^[\x21-\x39\x3b-\x7e]{1,64}$/.test(options.label)) throw new Error('--label must be 1 to 64 printable ASCII characters, without spaces or ":"');
      if (options.id !== undefined && !/^([0-9a-f]{2}){1,64}$/.test(options.id)) throw new Error('--id must be lowercase hex');
      const { generateTokenKey } = await import('./pkcs11-token.ts');
      const version = generateTokenKey(
        {
          modulePath: path.resolve(options.module),
          tokenLabel: options.tokenLabel,
          slot: options.slot === undefined ? undefined : Number(options.slot),
          pinFile: path.resolve(options.pinFile),
        },
        options.label,
        options.id === undefined ? {} : { id: Buffer.from(options.id, 'hex') },
      );
      console.log(`key ${options.label} created on the token: key version ${version}`);
    });
}
