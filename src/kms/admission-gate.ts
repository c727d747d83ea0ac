/**
 * Admission control for KMS Encrypt and Decrypt at the start of each gRPC call, as a
 * server interceptor: the decision is made from the call's headers alone, before its
 * request is read or decoded and before any handler runs.
 *
 * Under a burst most calls are refused, and a refusal must cost as little as possible:
 * every microsecond spent refusing is taken from the admitted work, and the client
 * (kube-apiserver: one connection, a bounded number of streams) sends its next call
 * only when a stream frees. A call refused here costs grpc-js's own bookkeeping and a
 * trailers-only answer (`UNAVAILABLE` "overloaded (kms): ..."); nothing of ours but a
 * few comparisons and a counter (docs/design/overload.md has the measurements).
 *
 * A refusal is decided at once but answered after a short hold (`refusalHoldMs`,
 * 200 ms by default). Answered at once, it frees its HTTP/2 stream at once, and the
 * client's next waiting call takes that stream and is refused in turn: under a burst
 * larger than the admission bound, one connection kept the plugin refusing as fast as
 * the two sides could exchange calls, which cost CPU and, worse, refused calls that
 * had most of their deadline left and would have been served moments later (a
 * 5,000-Decrypt burst was over in 2 s, half of it refused, with the deadline at 3 s:
 * docs/design/overload.md). Held, each refused call keeps its stream
 * busy for the hold, so refusals per second are bounded by the streams left over
 * above the admission bound divided by the hold, whatever the burst; the answer is
 * still an explicit UNAVAILABLE, well before the caller's deadline, and no request is
 * read or work started for it. At most MAX_HELD refusals wait at once (their streams
 * hold at most one flow-control window each); beyond that, or when the call's
 * deadline is nearer than the hold, the refusal is answered at once.
 *
 * An admitted call holds its slot until its status is sent or it is cancelled. A call
 * that must wait reads its request meanwhile, but its handler starts only once it has
 * a slot, so the engine's clocks (and every backend's) start after the wait.
 */
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { Admission, Slot } from '../engine/admission.ts';
import type { Metrics } from '../observability/metrics.ts';
import { resetStream } from './call-limits.ts';
import type { LoopLag } from './loop-lag.ts';
import { methodLabels, type Api } from './method-labels.ts';

/** The calls that do work: every other call (Status, Version, the admin API) never waits. */
const GATED = new Set(['/v2.KeyManagementService/Encrypt', '/v2.KeyManagementService/Decrypt', '/v1beta1.KeyManagementService/Encrypt', '/v1beta1.KeyManagementService/Decrypt']);

const LOG_EVERY_MS = 10_000;

/** Default hold of a refusal before it is answered; see the top of this file. */
export const DEFAULT_REFUSAL_HOLD_MS = 200;
/**
 * Refusals held at once, over all connections. A held call is a grpc-js call object,
 * a timer, and at most one HTTP/2 flow-control window (64 KiB) of unread request, so
 * the worst case is 32 MiB; beyond it refusals are answered at once.
 */
const MAX_HELD = 512;
/** A held refusal is answered at least this long before the call's deadline. */
const HOLD_DEADLINE_RESERVE_MS = 100;

/** Date.now() time of the call's deadline, from its grpc-timeout header; undefined without one. */
function deadlineOf(call: grpc.ServerInterceptingCallInterface): number | undefined {
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() : Number(deadline);
  return Number.isFinite(ms) && ms > 0 ? ms : undefined;
}

export function admissionGate(
  admission: Admission,
  metrics: Metrics,
  logger: Logger,
  refusalHoldMs = DEFAULT_REFUSAL_HOLD_MS,
  loopLag?: LoopLag,
): grpc.ServerInterceptor {
  let lastLogged = 0;
  let refusedSinceLog = 0;
  let held = 0;
  const refuse = (call: grpc.ServerInterceptingCallInterface, labels: { api: Api; method: string }, message: string) => {
    metrics.kmsRequests.inc({ ...labels, code: 'UNAVAILABLE' });
    refusedSinceLog += 1;
    const now = Date.now();
    // Refusals under overload come by the thousand: one line per interval.
    if (now - lastLogged >= LOG_EVERY_MS) {
      logger.warn({ refused: refusedSinceLog, inFlight: admission.inFlight, queued: admission.queued }, 'overloaded: refusing KMS calls');
      lastLogged = now;
      refusedSinceLog = 0;
    }
    call.sendStatus({ code: grpc.status.UNAVAILABLE, details: message });
    // Refused before its request was read: close the stream now (see resetStream).
    resetStream(call);
  };
  /** Answer a refusal decided at the call's start, after the hold when there is room and time for it. */
  const refuseHeld = (call: grpc.ServerInterceptingCallInterface, labels: { api: Api; method: string }, message: string, deadline: number | undefined) => {
    const hold = Math.min(refusalHoldMs, deadline === undefined ? Infinity : deadline - Date.now() - HOLD_DEADLINE_RESERVE_MS);
    if (hold <= 0 || held >= MAX_HELD) return refuse(call, labels, message);
    held += 1;
    // A call the client cancels meanwhile is closed already: grpc-js then sends nothing.
    setTimeout(() => {
      held -= 1;
      refuse(call, labels, message);
    }, hold);
  };

  return (descriptor, call) => {
    if (!GATED.has(descriptor.path)) return new grpc.ServerInterceptingCall(call);
    const labels = methodLabels(descriptor.path);
    let slot: Slot | undefined;
    let over = false;
    let leaveQueue: (() => void) | undefined;
    const finish = () => {
      over = true;
      slot?.release();
      slot = undefined;
      leaveQueue?.();
      leaveQueue = undefined;
    };
    return new grpc.ServerInterceptingCall(call, {
      start(next) {
        // The client's clock started when it sent the headers, up to a loop turn before
        // grpc-js read them and set this deadline (loop-lag.ts): admit against the earlier one.
        const fromHeaders = deadlineOf(call);
        const deadline = fromHeaders === undefined || !loopLag ? fromHeaders : fromHeaders - loopLag.recentMs();
        const decision = admission.admit(deadline);
        if (decision.kind === 'refused') {
          // The inner call is never started: its request is not even read. A held
          // refusal, too, must reach the client before its deadline.
          refuseHeld(call, labels, decision.message, deadline);
          return;
        }
        if (decision.kind === 'granted') slot = decision.slot;
        let halfClose: (() => void) | undefined;
        next({
          onReceiveHalfClose(nextHalfClose) {
            // The handler runs at half-close: not before this call has its slot.
            if (slot) nextHalfClose();
            else halfClose = nextHalfClose;
          },
          onCancel() {
            finish();
          },
        });
        if (decision.kind === 'waiting') {
          leaveQueue = () => decision.leave(new Error('the call ended while it waited'));
          decision.slot.then(
            (granted) => {
              leaveQueue = undefined;
              if (over) return granted.release();
              slot = granted;
              halfClose?.();
            },
            (error: unknown) => {
              leaveQueue = undefined;
              if (over) return;
              finish();
              refuse(call, labels, error instanceof Error ? error.message : 'overloaded (kms), retry later');
            },
          );
        }
      },
      sendStatus(status, nextStatus) {
        finish();
        nextStatus(status);
      },
    });
  };
}
