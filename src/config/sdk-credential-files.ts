/**
 * Credential files that a cloud SDK reads itself (the AWS default chain's web identity
 * token and shared files, Azure's workload identity token and client certificate):
 * checked by the trusted-path rule before the backend is created, by `trousseau
 * doctor`, and again each time the backend's credential asks the SDK for new
 * credentials, which is when the SDK reads them again. A local user who could replace
 * such a file could otherwise make the plugin authenticate as an identity of theirs
 * (whose key would then wrap the cluster's data keys) or have it send a file of their
 * choosing to the cloud. docs/security.md says what this does and does not cover.
 */
import { isTrousseauError, TrousseauError } from '../errors.ts';
import { checkSdkCredentialFile } from './trusted-path.ts';

/** One file a backend's SDK may read, and why. */
export interface SdkCredentialFile {
  /** What the file is, for messages: "AWS web identity token file". */
  role: string;
  /** The environment variable that named it, when one did. */
  variable?: string;
  /** Absolute path. */
  file: string;
  /** Holds a secret (a token, a key), as opposed to settings: doctor warns when others can read it. */
  secret: boolean;
}

/** "AWS web identity token file (AWS_WEB_IDENTITY_TOKEN_FILE)". */
export function describeSdkFile(file: SdkCredentialFile): string {
  return file.variable === undefined ? file.role : `${file.role} (${file.variable})`;
}

/**
 * Check every file; a missing one passes (the SDK decides), anything else refused
 * throws a CONFIG TrousseauError naming `who`, the role, the path and the reason,
 * never the content. `who` is "aws backend aws-a".
 */
export async function checkSdkCredentialFiles(who: string, files: readonly SdkCredentialFile[]): Promise<void> {
  for (const file of files) await checkOne(who, file);
}

/** Whether the file exists; throws as checkSdkCredentialFiles does when it is refused. */
export async function checkOne(who: string, file: SdkCredentialFile): Promise<boolean> {
  const what = `${who}: ${describeSdkFile(file)}`;
  try {
    return await checkSdkCredentialFile(file.file, what);
  } catch (error) {
    if (isTrousseauError(error)) throw error;
    const code = (error as NodeJS.ErrnoException | null)?.code;
    const shown = typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code) ? code : 'error';
    throw new TrousseauError('CONFIG', `refusing ${what}: ${file.file} cannot be checked (${shown})`, { cause: error });
  }
}

/**
 * The same check, for a credential that is about to ask the SDK for new credentials
 * (so about to make it read the files again): a refusal then is the backend being
 * unavailable, like any credential it cannot get, not a configuration error.
 */
export async function recheckSdkCredentialFiles(who: string, files: readonly SdkCredentialFile[]): Promise<void> {
  try {
    await checkSdkCredentialFiles(who, files);
  } catch (error) {
    const message = isTrousseauError(error) ? error.message : `${who}: credential files cannot be checked`;
    throw new TrousseauError('BACKEND_UNAVAILABLE', message, { cause: error });
  }
}
