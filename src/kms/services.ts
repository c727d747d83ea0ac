/**
 * gRPC handlers for KMS v2, KMS v1beta1 and the admin API. Each handler validates its
 * request, calls the core with an AbortSignal tied to the call's deadline and
 * cancellation, and answers with either a response or an explicit gRPC status.
 */
import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { buildInfo } from '../build-info.ts';
import { TrousseauError, errorCodeOf } from '../errors.ts';
import type { Metrics } from '../observability/metrics.ts';
import type { KmsCore } from './core.ts';
import { grpcCodeName, toGrpcError } from './grpc-status.ts';
import { MALFORMED_REQUEST } from './proto.ts';
import type * as T from './types.ts';
import { checkAnnotations, checkCiphertext, checkKeyId, checkPlaintext, checkV1Version, safeUid } from './validate.ts';

type Api = 'v2' | 'v1beta1' | 'admin';

interface HandlerContext {
  core: KmsCore;
  logger: Logger;
  metrics: Metrics;
  /** Tracks in-flight calls so shutdown can wait for them. */
  inFlight: Set<Promise<unknown>>;
}

/** An AbortSignal that fires when the client cancels or the call's deadline passes. */
function callSignal(call: grpc.ServerUnaryCall<unknown, unknown>): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController();
  const onCancel = () => controller.abort(new Error('client cancelled'));
  call.on('cancelled', onCancel);
  let timer: NodeJS.Timeout | undefined;
  const deadline = call.getDeadline();
  const deadlineMs = deadline instanceof Date ? deadline.getTime() : Number(deadline);
  const hasDeadline = Number.isFinite(deadlineMs) && deadlineMs > 0;
  if (hasDeadline) {
    timer = setTimeout(() => controller.abort(new Error('deadline passed')), Math.max(0, deadlineMs - Date.now()));
  }
  return {
    signal: controller.signal,
    dispose: () => {
      clearTimeout(timer);
      call.removeListener('cancelled', onCancel);
    },
  };
}

const OVERLOAD_WARNING_INTERVAL_MS = 10_000;
const lastOverloadWarning = new WeakMap<HandlerContext, number>();

function overloadWarningDue(ctx: HandlerContext): boolean {
  const now = Date.now();
  if (now - (lastOverloadWarning.get(ctx) ?? 0) < OVERLOAD_WARNING_INTERVAL_MS) return false;
  lastOverloadWarning.set(ctx, now);
  return true;
}

function unary<Req, Res>(
  ctx: HandlerContext,
  api: Api,
  method: string,
  body: (request: Req, signal: AbortSignal, uid: string | undefined) => Promise<Res> | Res,
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    const started = performance.now();
    const { signal, dispose } = callSignal(call);
    const request = call.request as Req | typeof MALFORMED_REQUEST;
    const uid = request === MALFORMED_REQUEST ? undefined : safeUid((request as { uid?: string }).uid);
    // Encrypt and Decrypt reach this point only with an admission slot, taken at the
    // start of the call (kms/admission-gate.ts): the engine's clocks start after the wait.
    const work = (async () => {
      try {
        if (request === MALFORMED_REQUEST) throw new TrousseauError('INVALID_INPUT', `request is not a valid ${method} message`);
        const response = await body(request, signal, uid);
        ctx.metrics.kmsRequests.inc({ api, method, code: 'OK' });
        ctx.logger.debug({ api, method, uid, ms: Math.round(performance.now() - started) }, 'kms call');
        callback(null, response);
      } catch (error) {
        const grpcError = toGrpcError(error);
        const code = grpcCodeName(grpcError.code!);
        ctx.metrics.kmsRequests.inc({ api, method, code });
        const errorCode = errorCodeOf(error);
        // Refusals under overload come by the thousand: one warning per interval, the rest at debug.
        const level = code === 'INVALID_ARGUMENT' ? 'info' : errorCode === 'OVERLOADED' && !overloadWarningDue(ctx) ? 'debug' : 'warn';
        ctx.logger[level]({ api, method, uid, code, error: errorCode, details: grpcError.details }, 'kms call failed');
        if (errorCodeOf(error) === 'INTERNAL') ctx.logger.error({ err: error }, 'internal error');
        callback(grpcError, null);
      } finally {
        dispose();
        ctx.metrics.kmsLatency.observe({ api, method }, (performance.now() - started) / 1000);
      }
    })();
    ctx.inFlight.add(work);
    void work.finally(() => ctx.inFlight.delete(work));
  };
}

function toRecord(map: ReadonlyMap<string, Uint8Array>): Record<string, Buffer> {
  const record: Record<string, Buffer> = {};
  for (const [key, value] of map) record[key] = Buffer.from(value);
  return record;
}

export function v2Handlers(ctx: HandlerContext): grpc.UntypedServiceImplementation {
  return {
    Status: unary<unknown, T.V2StatusResponse>(ctx, 'v2', 'Status', () => {
      const status = ctx.core.status();
      return { version: 'v2', healthz: status.healthz, key_id: status.keyId };
    }),
    Encrypt: unary<T.V2EncryptRequest, T.V2EncryptResponse>(ctx, 'v2', 'Encrypt', async (request, signal, uid) => {
      const plaintext = checkPlaintext(request.plaintext);
      const result = await ctx.core.encrypt(plaintext, 'v2', signal, uid);
      return { ciphertext: result.ciphertext, key_id: result.keyId, annotations: toRecord(result.annotations) };
    }),
    Decrypt: unary<T.V2DecryptRequest, T.V2DecryptResponse>(ctx, 'v2', 'Decrypt', async (request, signal, uid) => {
      const ciphertext = checkCiphertext(request.ciphertext);
      checkKeyId(request.key_id);
      const annotations = checkAnnotations(request.annotations);
      return { plaintext: await ctx.core.decrypt(ciphertext, annotations, signal, uid) };
    }),
  };
}

export function v1Handlers(ctx: HandlerContext): grpc.UntypedServiceImplementation {
  return {
    Version: unary<T.V1VersionRequest, T.V1VersionResponse>(ctx, 'v1beta1', 'Version', () => ({
      version: 'v1beta1',
      runtime_name: 'trousseau',
      // One source of truth with --version and trousseau_build_info: package.json, or the image's build-info.json.
      runtime_version: buildInfo().version,
    })),
    Encrypt: unary<T.V1EncryptRequest, T.V1EncryptResponse>(ctx, 'v1beta1', 'Encrypt', async (request, signal) => {
      checkV1Version(request.version);
      const plaintext = checkPlaintext(request.plain);
      return { cipher: (await ctx.core.encrypt(plaintext, 'v1', signal)).ciphertext };
    }),
    Decrypt: unary<T.V1DecryptRequest, T.V1DecryptResponse>(ctx, 'v1beta1', 'Decrypt', async (request, signal) => {
      checkV1Version(request.version);
      return { plain: await ctx.core.decrypt(checkCiphertext(request.cipher), new Map(), signal) };
    }),
  };
}

export function adminHandlers(ctx: HandlerContext): grpc.UntypedServiceImplementation {
  return {
    Status: unary<unknown, T.AdminStatusResponse>(ctx, 'admin', 'Status', () => ({ status_json: JSON.stringify(ctx.core.describe()) })),
    Verify: unary<T.AdminVerifyRequest, T.AdminVerifyResponse>(ctx, 'admin', 'Verify', async (request, signal) => {
      if (!ctx.core.verifyEscrow) throw new TrousseauError('INTERNAL', 'this plugin cannot verify escrow');
      const report = await ctx.core.verifyEscrow(signal, request.renew_canary === true);
      return { ok: report.ok, report_json: JSON.stringify(report) };
    }),
  };
}

export type { HandlerContext };
