/**
 * The PKCS#11 side of the pkcs11 backend: everything that calls the vendor's module.
 * It runs only inside the backend's worker thread (pkcs11-worker.ts) and in the
 * `trousseau pkcs11-keygen` command, never on the plugin's event loop: every
 * PKCS#11 function is a blocking C call that can take as long as the HSM wants.
 *
 * What it holds: the loaded module, one logged-in session on the configured token,
 * and the handles of the configured keys, each checked against the key policy
 * (policies/pkcs11/key-template.json) before it is used. Any error that says the
 * session, the login or the token is gone drops all of that; the next call logs in
 * again (see `TokenConnection.run`).
 *
 * Wrap mechanism: CKM_AES_GCM with a 96-bit IV and a 128-bit tag, the wrap context
 * as AAD, over the 32-byte data key passed as data (C_Encrypt). The IV is drawn by
 * the plugin from the operating system's CSPRNG, not by the token: PKCS#11 2.40
 * GCM takes the IV from the caller, and random 96-bit IVs stay safe far beyond the
 * number of wraps a cluster makes under one key (NIST SP 800-38D, 2^32 messages).
 * The copy is IV || ciphertext || tag (60 bytes). See docs/backends/pkcs11.md.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsConstants, fstatSync, openSync, readSync, realpathSync, statSync } from 'node:fs';
import pkcs11js from 'pkcs11js';

export const IV_BYTES = 12;
export const TAG_BYTES = 16;
export const DATA_KEY_BYTES = 32;
export const WRAPPED_BYTES = IV_BYTES + DATA_KEY_BYTES + TAG_BYTES;
/** A PIN file holds one line; anything larger is not one. */
const MAX_PIN_FILE_BYTES = 1024;
const READ_FLAGS = fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY;

/** Where the token is and which keys to use; plain data, so it crosses into the worker. */
export interface TokenSettings {
  /** Absolute path of the vendor's PKCS#11 module (a shared library). */
  modulePath: string;
  tokenLabel?: string | undefined;
  slot?: number | undefined;
  /** Absolute path of the file holding the user PIN. */
  pinFile: string;
  /** The key new wraps use, then keys kept only to unwrap older copies. */
  keys: readonly KeySelector[];
}

export interface KeySelector {
  label: string;
  /** CKA_ID as hex, when several objects share a label. */
  id?: string | undefined;
}

/**
 * How a failure is classified. `rejected`: the key or the request (a copy that does
 * not authenticate, a key refused by policy). `unavailable`: anything that may work
 * later (token absent, login failed, device error).
 */
export type FailureKind = 'rejected' | 'unavailable';

export class TokenFailure extends Error {
  readonly kind: FailureKind;
  /** The CKR_ name of the PKCS#11 result, when there was one (never a PIN or key bytes). */
  readonly ckr: string | undefined;
  constructor(kind: FailureKind, message: string, ckr?: string) {
    super(message);
    this.name = 'TokenFailure';
    this.kind = kind;
    this.ckr = ckr;
  }
}

/** Results that mean the session, the login or the token is gone: log in again and retry once. */
const SESSION_LOST = new Set([
  'CKR_SESSION_HANDLE_INVALID',
  'CKR_SESSION_CLOSED',
  'CKR_SESSION_COUNT',
  'CKR_TOKEN_NOT_PRESENT',
  'CKR_TOKEN_NOT_RECOGNIZED',
  'CKR_DEVICE_REMOVED',
  'CKR_DEVICE_ERROR',
  'CKR_USER_NOT_LOGGED_IN',
  'CKR_CRYPTOKI_NOT_INITIALIZED',
  'CKR_SLOT_ID_INVALID',
  'CKR_KEY_HANDLE_INVALID',
  'CKR_OBJECT_HANDLE_INVALID',
  'CKR_OPERATION_ACTIVE',
  'CKR_GENERAL_ERROR',
]);

/** Results that are about the copy or the key, not about the token's health. */
const REJECTED = new Set([
  'CKR_ENCRYPTED_DATA_INVALID',
  'CKR_ENCRYPTED_DATA_LEN_RANGE',
  'CKR_DATA_INVALID',
  'CKR_DATA_LEN_RANGE',
  'CKR_KEY_FUNCTION_NOT_PERMITTED',
  'CKR_KEY_TYPE_INCONSISTENT',
  'CKR_KEY_SIZE_RANGE',
  'CKR_MECHANISM_INVALID',
  'CKR_MECHANISM_PARAM_INVALID',
  'CKR_AAD_INVALID' /* not in 2.40; some vendors */,
  'CKR_ARGUMENTS_BAD',
]);

/** The CKR_ name of a pkcs11js error; pkcs11js puts only that name (and the number) in its message. */
export function ckrOf(error: unknown): string | undefined {
  const message = error instanceof Error ? error.message : '';
  const match = /^(CKR_[A-Z0-9_]{1,60})/.exec(message);
  return match?.[1];
}

function failureOf(error: unknown, what: string): TokenFailure {
  if (error instanceof TokenFailure) return error;
  const ckr = ckrOf(error);
  if (ckr && REJECTED.has(ckr)) return new TokenFailure('rejected', `${what}: ${ckr}`, ckr);
  // A non-PKCS#11 error text can carry anything the module put in it: keep only its class.
  return new TokenFailure('unavailable', `${what}: ${ckr ?? (error instanceof Error ? error.name : 'error')}`, ckr);
}

/**
 * Read the PIN from its file without following a link, and only from a regular file
 * that belongs to the plugin's user (or root) and that group and others cannot read,
 * as with every other credential file. The PIN never appears in a message.
 */
export function readPinFile(file: string): { pin: string; identity: string } {
  let fd: number;
  try {
    fd = openSync(file, READ_FLAGS);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'error';
    if (code === 'ELOOP') throw new TokenFailure('unavailable', `PIN file ${file} is a symbolic link; name the file itself`);
    throw new TokenFailure('unavailable', `PIN file ${file} cannot be read (${code})`);
  }
  try {
    const info = fstatSync(fd, { bigint: true });
    if (!info.isFile()) throw new TokenFailure('unavailable', `PIN file ${file} is not a regular file`);
    const owner = Number(info.uid);
    const euid = process.geteuid?.() ?? owner;
    if (owner !== euid && owner !== 0) throw new TokenFailure('unavailable', `PIN file ${file} is owned by uid ${owner}, not by the plugin's user (uid ${euid}) or root`);
    const mode = Number(info.mode) & 0o777;
    if ((mode & 0o077) !== 0) throw new TokenFailure('unavailable', `PIN file ${file} is readable by group or others (mode ${mode.toString(8)}); chmod 600 it`);
    if (info.size > BigInt(MAX_PIN_FILE_BYTES)) throw new TokenFailure('unavailable', `PIN file ${file} is larger than a PIN file can be`);
    const bytes = Buffer.alloc(MAX_PIN_FILE_BYTES + 1);
    const read = readSync(fd, bytes, 0, bytes.length, 0);
    const pin = bytes.subarray(0, read).toString('utf8').replace(/\r?\n$/, '');
    bytes.fill(0);
    if (pin.length === 0) throw new TokenFailure('unavailable', `PIN file ${file} is empty`);
    if (/[\r\n]/.test(pin)) throw new TokenFailure('unavailable', `PIN file ${file} holds more than one line`);
    return { pin, identity: `${info.dev}:${info.ino}:${info.size}:${info.mtimeNs}:${info.ctimeNs}` };
  } finally {
    closeSync(fd);
  }
}

/**
 * A PKCS#11 module is code the plugin runs as root: refuse one that group or others
 * could replace. Links are followed here on purpose (vendors install versioned
 * libraries behind a link); the file they lead to is what is checked.
 */
export function checkModuleFile(modulePath: string): string {
  let real: string;
  try {
    real = realpathSync(modulePath);
  } catch (error) {
    throw new TokenFailure('unavailable', `PKCS#11 module ${modulePath} cannot be found (${(error as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  const info = statSync(real);
  if (!info.isFile()) throw new TokenFailure('unavailable', `PKCS#11 module ${modulePath} is not a regular file`);
  const euid = process.geteuid?.() ?? info.uid;
  if (info.uid !== 0 && info.uid !== euid) throw new TokenFailure('unavailable', `PKCS#11 module ${modulePath} is owned by uid ${info.uid}, not by root or the plugin's user`);
  if ((info.mode & 0o022) !== 0) throw new TokenFailure('unavailable', `PKCS#11 module ${modulePath} is writable by group or others`);
  return real;
}

/** Attributes of a key object as the policy check reads them. */
export interface KeyAttributes {
  keyType: number | undefined;
  valueLength: number | undefined;
  flags: Record<(typeof BOOLEAN_ATTRIBUTES)[number][0], boolean | undefined>;
  checkValue: Buffer | undefined;
  id: Buffer | undefined;
}

const BOOLEAN_ATTRIBUTES = [
  ['token', pkcs11js.CKA_TOKEN],
  ['sensitive', pkcs11js.CKA_SENSITIVE],
  ['extractable', pkcs11js.CKA_EXTRACTABLE],
  ['neverExtractable', pkcs11js.CKA_NEVER_EXTRACTABLE],
  ['encrypt', pkcs11js.CKA_ENCRYPT],
  ['decrypt', pkcs11js.CKA_DECRYPT],
  ['wrap', pkcs11js.CKA_WRAP],
  ['unwrap', pkcs11js.CKA_UNWRAP],
  ['sign', pkcs11js.CKA_SIGN],
  ['verify', pkcs11js.CKA_VERIFY],
  ['derive', pkcs11js.CKA_DERIVE],
] as const;

/**
 * The key policy (policies/pkcs11/key-template.json): an AES-256 token object that
 * never leaves the token in clear and can only encrypt and decrypt. Returns why a
 * key breaks it, or undefined. `current` keys must encrypt; previous keys need only
 * decrypt.
 */
export function policyViolation(a: KeyAttributes): string | undefined {
  if (a.keyType !== pkcs11js.CKK_AES) return 'is not an AES key';
  if (a.valueLength !== DATA_KEY_BYTES) return `is not a 256-bit key (CKA_VALUE_LEN ${a.valueLength ?? 'unknown'})`;
  if (a.flags.token !== true) return 'is a session object, not a token object';
  if (a.flags.extractable !== false) return 'is extractable (CKA_EXTRACTABLE must be false)';
  if (a.flags.sensitive !== true) return 'is not sensitive (CKA_SENSITIVE must be true)';
  if (a.flags.decrypt !== true) return 'cannot decrypt (CKA_DECRYPT must be true)';
  for (const name of ['wrap', 'unwrap', 'sign', 'verify', 'derive'] as const) {
    if (a.flags[name] === true) return `allows ${name} (CKA_${name.toUpperCase()} must be false: the key only encrypts and decrypts data keys)`;
  }
  return undefined;
}

/** The key version: the label and the token's check value, so a re-created key with the same label is another version. */
export function keyVersionOf(label: string, a: KeyAttributes): string {
  if (a.checkValue && a.checkValue.length > 0) return `${label}:${a.checkValue.toString('hex')}`;
  // Tokens without CKA_CHECK_VALUE (PKCS#11 before 2.40): the id is the best stable name there is.
  return `${label}:id-${a.id?.toString('hex') ?? 'none'}`;
}

interface ResolvedKey {
  label: string;
  handle: pkcs11js.Handle;
  version: string;
  canEncrypt: boolean;
  /** Whether a test copy made with this key on this session opened again (see currentKey). */
  roundTripChecked?: boolean;
}

/**
 * A loaded PKCS#11 module. Its state (initialised or not, the login) is one per
 * process, so every backend on the same module shares one of these, in one worker:
 * re-initialising it for one backend's token ends every backend's sessions, which
 * `generation` tells the others.
 */
export class LoadedModule {
  readonly lib: pkcs11js.PKCS11;
  private initialized = false;
  /** Bumped at each re-initialisation: sessions of an older generation are gone. */
  generation = 0;

  constructor(modulePath: string) {
    const real = checkModuleFile(modulePath);
    this.lib = new pkcs11js.PKCS11();
    this.lib.load(real);
  }

  ready(): pkcs11js.PKCS11 {
    if (!this.initialized) {
      try {
        this.lib.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
      } catch (error) {
        // A worker that died without finalizing leaves the module initialized for the process.
        if (ckrOf(error) !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') throw error;
      }
      this.initialized = true;
    }
    return this.lib;
  }

  /**
   * Finalize, so that the next use starts from C_Initialize: some modules (SoftHSM2
   * among them) see a token that was removed and put back, or re-initialised, only then.
   */
  reinitialize(): void {
    if (!this.initialized) return;
    try {
      this.lib.C_Finalize();
    } catch {
      // nothing left to release
    }
    this.initialized = false;
    this.generation += 1;
  }
}

interface Connection {
  generation: number;
  slot: pkcs11js.Handle;
  session: pkcs11js.Handle;
  /** Resolved keys by label; a key is looked up at its first use. */
  keys: Map<string, ResolvedKey>;
}

/**
 * One module, one token, one logged-in session. Calls are made one at a time (the
 * worker thread is the only caller), which is what a PKCS#11 session allows.
 */
export class TokenConnection {
  private readonly settings: TokenSettings;
  private readonly module: () => LoadedModule;
  private connection: Connection | undefined;
  /** The PIN file content that failed to log in: never tried again, so a wrong PIN cannot lock the token. */
  private refusedPin: string | undefined;
  /** After a failed connection, calls fail fast until this time instead of hammering the token. */
  private retryAfter = 0;
  private lastFailure: TokenFailure | undefined;
  /** Count of logins since start, for tests and the log. */
  logins = 0;

  /** `module` is called at the first connection: loading the module can fail, and that is an outage like any other. */
  constructor(settings: TokenSettings, module: () => LoadedModule) {
    this.settings = settings;
    this.module = module;
  }

  /** Run `body` on a logged-in session; on a lost session or token, log in again once and retry. */
  run<T>(body: (lib: pkcs11js.PKCS11, connection: Connection) => T, what: string): T {
    let connection = this.connect();
    try {
      return body(this.module().lib, connection);
    } catch (error) {
      const ckr = ckrOf(error);
      if (!ckr || !SESSION_LOST.has(ckr)) throw failureOf(error, what);
      this.drop(true);
    }
    connection = this.connect();
    try {
      return body(this.module().lib, connection);
    } catch (error) {
      const failure = failureOf(error, what);
      if (failure.ckr && SESSION_LOST.has(failure.ckr)) this.drop(true);
      throw failure;
    }
  }

  /**
   * The key new wraps use. Before its first wrap on a session it makes one test copy
   * and opens it again: a token that ignores or replaces the caller's IV (some HSMs
   * in FIPS mode generate GCM IVs themselves) would otherwise hand out copies that
   * never unwrap. Such a token is refused; nothing is wrapped with it.
   */
  currentKey(connection: Connection): ResolvedKey {
    const key = this.resolve(connection, this.settings.keys[0]!);
    if (!key.canEncrypt) throw new TokenFailure('rejected', `key ${key.label} cannot encrypt (CKA_ENCRYPT must be true for the current key)`);
    if (!key.roundTripChecked) {
      const lib = this.module().lib;
      const probe = randomBytes(DATA_KEY_BYTES);
      const iv = randomBytes(IV_BYTES);
      const aad = Buffer.from('trousseau/pkcs11/round-trip-check');
      let opened: Buffer | undefined;
      try {
        lib.C_EncryptInit(connection.session, gcm(iv, aad), key.handle);
        const sealed = lib.C_Encrypt(connection.session, probe, Buffer.alloc(DATA_KEY_BYTES + TAG_BYTES));
        lib.C_DecryptInit(connection.session, gcm(iv, aad), key.handle);
        opened = lib.C_Decrypt(connection.session, sealed, Buffer.alloc(DATA_KEY_BYTES + TAG_BYTES));
      } catch (error) {
        const ckr = ckrOf(error);
        if (ckr && SESSION_LOST.has(ckr) && ckr !== 'CKR_GENERAL_ERROR') throw error;
        opened = undefined;
      }
      const same = opened !== undefined && opened.equals(probe);
      probe.fill(0);
      opened?.fill(0);
      if (!same) throw new TokenFailure('rejected', `key ${key.label}: an AES-GCM copy made with the plugin's IV does not open again on this token (does it generate GCM IVs itself? see docs/backends/pkcs11.md)`);
      key.roundTripChecked = true;
    }
    return key;
  }

  /** The configured key whose version is `version`: only configured labels are ever looked up. */
  keyForVersion(connection: Connection, version: string): ResolvedKey {
    const label = version.slice(0, version.lastIndexOf(':'));
    const selector = this.settings.keys.find((k) => k.label === label);
    if (!selector) throw new TokenFailure('rejected', `no configured key has the label of key version ${version}`);
    const key = this.resolve(connection, selector);
    if (key.version !== version) throw new TokenFailure('rejected', `key ${label} on the token is not version ${version} (it was re-created)`);
    return key;
  }

  wrap(dataKey: Uint8Array, aad: Buffer): { wrapped: Buffer; keyVersion: string } {
    return this.run((lib, connection) => {
      const key = this.currentKey(connection);
      const iv = randomBytes(IV_BYTES);
      lib.C_EncryptInit(connection.session, gcm(iv, aad), key.handle);
      const sealed = lib.C_Encrypt(connection.session, Buffer.from(dataKey), Buffer.alloc(DATA_KEY_BYTES + TAG_BYTES));
      if (sealed.length !== DATA_KEY_BYTES + TAG_BYTES) throw new TokenFailure('unavailable', `the token returned ${sealed.length} bytes for an AES-GCM wrap`);
      return { wrapped: Buffer.concat([iv, sealed]), keyVersion: key.version };
    }, 'wrap');
  }

  unwrap(wrapped: Uint8Array, keyVersion: string, aad: Buffer): Buffer {
    if (wrapped.length !== WRAPPED_BYTES) throw new TokenFailure('rejected', 'wrapped key has the wrong length for a pkcs11 copy');
    const bytes = Buffer.from(wrapped);
    return this.run((lib, connection) => {
      const key = this.keyForVersion(connection, keyVersion);
      lib.C_DecryptInit(connection.session, gcm(bytes.subarray(0, IV_BYTES), aad), key.handle);
      let dataKey: Buffer;
      try {
        dataKey = lib.C_Decrypt(connection.session, bytes.subarray(IV_BYTES), Buffer.alloc(DATA_KEY_BYTES + TAG_BYTES));
      } catch (error) {
        throw tagFailureOr(lib, connection, error);
      }
      if (dataKey.length !== DATA_KEY_BYTES) {
        dataKey.fill(0);
        throw new TokenFailure('rejected', 'the token returned a key of the wrong length');
      }
      return dataKey;
    }, 'unwrap');
  }

  currentKeyVersion(): string {
    return this.run((_lib, connection) => this.currentKey(connection).version, 'key lookup');
  }

  /** Close this backend's session (the module and its login stay for the others). */
  close(): void {
    this.drop(false);
  }

  // ---------------------------------------------------------------- connection

  private connect(): Connection {
    if (this.connection && this.connection.generation !== this.moduleGeneration()) this.connection = undefined;
    if (this.connection) return this.connection;
    if (Date.now() < this.retryAfter && this.lastFailure) throw this.lastFailure;
    try {
      this.connection = this.open();
      this.lastFailure = undefined;
      return this.connection;
    } catch (error) {
      const failure = failureOf(error, 'connecting to the token');
      this.lastFailure = failure;
      this.retryAfter = Date.now() + 500;
      this.drop(true);
      throw failure;
    }
  }

  private moduleGeneration(): number {
    return this.module().generation;
  }

  private open(): Connection {
    const module = this.module();
    const lib = module.ready();
    const slot = findSlot(lib, this.settings);
    const mechanisms = lib.C_GetMechanismList(slot);
    if (!mechanisms.includes(pkcs11js.CKM_AES_GCM)) throw new TokenFailure('unavailable', 'the token does not offer CKM_AES_GCM, the only mechanism this backend wraps with');
    const info = lib.C_GetMechanismInfo(slot, pkcs11js.CKM_AES_GCM);
    if ((info.flags & pkcs11js.CKF_ENCRYPT) === 0 || (info.flags & pkcs11js.CKF_DECRYPT) === 0) {
      throw new TokenFailure('unavailable', 'the token offers CKM_AES_GCM without encrypt and decrypt');
    }
    const { pin } = readPinFile(this.settings.pinFile);
    if (this.refusedPin !== undefined && this.refusedPin === pin) {
      throw new TokenFailure('unavailable', 'the token refused the PIN in the PIN file; it is not tried again until the file changes (a token locks after a few wrong PINs)', 'CKR_PIN_INCORRECT');
    }
    // A read-only session: the backend never creates or changes objects.
    const session = lib.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION);
    try {
      lib.C_Login(session, pkcs11js.CKU_USER, pin);
    } catch (error) {
      const ckr = ckrOf(error);
      if (ckr === 'CKR_USER_ALREADY_LOGGED_IN') {
        // Login state is per application: another session of ours is logged in already.
      } else {
        if (ckr === 'CKR_PIN_INCORRECT' || ckr === 'CKR_PIN_LEN_RANGE' || ckr === 'CKR_PIN_EXPIRED') this.refusedPin = pin;
        try {
          lib.C_CloseSession(session);
        } catch {
          // the session is being abandoned anyway
        }
        throw new TokenFailure('unavailable', `login to the token failed (${ckr ?? 'error'})`, ckr);
      }
    }
    this.refusedPin = undefined;
    this.logins += 1;
    return { generation: module.generation, slot, session, keys: new Map() };
  }

  private resolve(connection: Connection, selector: KeySelector): ResolvedKey {
    const known = connection.keys.get(selector.label);
    if (known) return known;
    const lib = this.module().lib;
    const template: pkcs11js.Template = [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_LABEL, value: selector.label },
    ];
    if (selector.id) template.push({ type: pkcs11js.CKA_ID, value: Buffer.from(selector.id, 'hex') });
    lib.C_FindObjectsInit(connection.session, template);
    let handles: pkcs11js.Handle[];
    try {
      handles = lib.C_FindObjects(connection.session, 2);
    } finally {
      lib.C_FindObjectsFinal(connection.session);
    }
    const name = selector.id ? `${selector.label} (id ${selector.id})` : selector.label;
    if (handles.length === 0) throw new TokenFailure('rejected', `no secret key ${name} is on the token`);
    if (handles.length > 1) throw new TokenFailure('rejected', `several secret keys are labelled ${selector.label}; give the key's id too`);
    const handle = handles[0]!;
    const attributes = readKeyAttributes(lib, connection.session, handle);
    const violation = policyViolation(attributes);
    if (violation) throw new TokenFailure('rejected', `key ${name} refused: it ${violation}; see policies/pkcs11/`);
    const key: ResolvedKey = { label: selector.label, handle, version: keyVersionOf(selector.label, attributes), canEncrypt: attributes.flags.encrypt === true };
    connection.keys.set(selector.label, key);
    return key;
  }

  /**
   * Forget the session; with `finalize`, re-initialise the module as well (see
   * LoadedModule.reinitialize). A session of an older generation is not closed: its
   * handle may by now name another backend's session.
   */
  private drop(finalize: boolean): void {
    const connection = this.connection;
    this.connection = undefined;
    let module: LoadedModule;
    try {
      module = this.module();
    } catch {
      return; // never loaded: nothing to release
    }
    if (connection && connection.generation === module.generation) {
      try {
        module.lib.C_CloseSession(connection.session);
      } catch {
        // already gone with the token
      }
    }
    if (finalize) module.reinitialize();
  }
}

/** The slot of the configured token: by slot number, or by a label exactly one present token has. */
export function findSlot(lib: pkcs11js.PKCS11, settings: Pick<TokenSettings, 'slot' | 'tokenLabel'>): pkcs11js.Handle {
  const slots = lib.C_GetSlotList(true);
  if (settings.slot !== undefined) {
    const wanted = settings.slot;
    const slot = slots.find((s) => s.readUIntLE(0, Math.min(6, s.length)) === wanted);
    if (!slot) throw new TokenFailure('unavailable', `no token is present in slot ${wanted}`, 'CKR_TOKEN_NOT_PRESENT');
    return slot;
  }
  const matching = slots.filter((s) => lib.C_GetTokenInfo(s).label.trim() === settings.tokenLabel);
  if (matching.length === 0) throw new TokenFailure('unavailable', `no token labelled ${settings.tokenLabel} is present`, 'CKR_TOKEN_NOT_PRESENT');
  if (matching.length > 1) throw new TokenFailure('unavailable', `${matching.length} tokens are labelled ${settings.tokenLabel}; name the slot instead`);
  return matching[0]!;
}

/**
 * Tokens report a GCM tag that does not verify in different ways: the standard
 * CKR_ENCRYPTED_DATA_INVALID, or (SoftHSM2 2.6) CKR_GENERAL_ERROR, which is also
 * what a failing device says. Told apart by asking whether the session still works:
 * if it does, the copy is what failed (rejected, and no reconnection).
 */
function tagFailureOr(lib: pkcs11js.PKCS11, connection: Connection, error: unknown): unknown {
  const ckr = ckrOf(error);
  if (ckr !== 'CKR_GENERAL_ERROR' && ckr !== 'CKR_FUNCTION_FAILED') return error;
  try {
    lib.C_GetSessionInfo(connection.session);
  } catch {
    return error;
  }
  return new TokenFailure('rejected', `the copy does not authenticate under this key (${ckr})`, ckr);
}

function gcm(iv: Buffer, aad: Buffer): pkcs11js.Mechanism {
  return {
    mechanism: pkcs11js.CKM_AES_GCM,
    parameter: { type: pkcs11js.CK_PARAMS_GCM, iv, ivBits: IV_BYTES * 8, aad, tagBits: TAG_BYTES * 8 } as pkcs11js.GcmParams,
  };
}

/** Read what the policy check needs, one attribute at a time: a token may not know some of them. */
export function readKeyAttributes(lib: pkcs11js.PKCS11, session: pkcs11js.Handle, handle: pkcs11js.Handle): KeyAttributes {
  const read = (type: number): Buffer | undefined => {
    try {
      const [attribute] = lib.C_GetAttributeValue(session, handle, [{ type }]);
      const value = attribute?.value;
      return Buffer.isBuffer(value) ? value : undefined;
    } catch (error) {
      const ckr = ckrOf(error);
      if (ckr === 'CKR_ATTRIBUTE_TYPE_INVALID' || ckr === 'CKR_ATTRIBUTE_SENSITIVE') return undefined;
      throw error;
    }
  };
  const number = (value: Buffer | undefined) => (value && value.length > 0 ? Number(value.readUIntLE(0, Math.min(6, value.length))) : undefined);
  const flags = {} as KeyAttributes['flags'];
  for (const [name, type] of BOOLEAN_ATTRIBUTES) {
    const value = read(type);
    flags[name] = value && value.length > 0 ? value[0] !== 0 : undefined;
  }
  return {
    keyType: number(read(pkcs11js.CKA_KEY_TYPE)),
    valueLength: number(read(pkcs11js.CKA_VALUE_LEN)),
    flags,
    checkValue: read(pkcs11js.CKA_CHECK_VALUE),
    id: read(pkcs11js.CKA_ID),
  };
}

/** The template `trousseau pkcs11-keygen` creates keys with: policies/pkcs11/key-template.json, as attributes. */
export function keyTemplate(label: string, id: Buffer, overrides: { extractable?: boolean } = {}): pkcs11js.Template {
  return [
    { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
    { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
    { type: pkcs11js.CKA_VALUE_LEN, value: DATA_KEY_BYTES },
    { type: pkcs11js.CKA_LABEL, value: label },
    { type: pkcs11js.CKA_ID, value: id },
    { type: pkcs11js.CKA_TOKEN, value: true },
    { type: pkcs11js.CKA_PRIVATE, value: true },
    { type: pkcs11js.CKA_SENSITIVE, value: true },
    { type: pkcs11js.CKA_EXTRACTABLE, value: overrides.extractable ?? false },
    { type: pkcs11js.CKA_MODIFIABLE, value: false },
    { type: pkcs11js.CKA_ENCRYPT, value: true },
    { type: pkcs11js.CKA_DECRYPT, value: true },
    { type: pkcs11js.CKA_WRAP, value: false },
    { type: pkcs11js.CKA_UNWRAP, value: false },
    { type: pkcs11js.CKA_SIGN, value: false },
    { type: pkcs11js.CKA_VERIFY, value: false },
    { type: pkcs11js.CKA_DERIVE, value: false },
  ];
}

/**
 * Generate a key on the token (never outside it) with the policy's template, in a
 * read-write session of its own. For tests and first installs (`trousseau
 * pkcs11-keygen`); returns the key version the backend will report for it.
 */
export function generateTokenKey(settings: Omit<TokenSettings, 'keys'>, label: string, options: { id?: Buffer; extractable?: boolean } = {}): string {
  const lib = new pkcs11js.PKCS11();
  lib.load(checkModuleFile(settings.modulePath));
  lib.C_Initialize();
  try {
    const slot = findSlot(lib, settings);
    const session = lib.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
    lib.C_Login(session, pkcs11js.CKU_USER, readPinFile(settings.pinFile).pin);
    lib.C_FindObjectsInit(session, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_LABEL, value: label },
    ]);
    const existing = lib.C_FindObjects(session, 1);
    lib.C_FindObjectsFinal(session);
    if (existing.length > 0) throw new TokenFailure('rejected', `a secret key labelled ${label} is on the token already; keygen never adds a second one (rotate to a new label)`);
    const handle = lib.C_GenerateKey(session, { mechanism: pkcs11js.CKM_AES_KEY_GEN }, keyTemplate(label, options.id ?? randomBytes(8), options));
    const version = keyVersionOf(label, readKeyAttributes(lib, session, handle));
    lib.C_Logout(session);
    lib.C_CloseSession(session);
    return version;
  } catch (error) {
    throw failureOf(error, `key generation on the token`);
  } finally {
    lib.C_Finalize();
  }
}
