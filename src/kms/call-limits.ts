/**
 * A gRPC server interceptor that bounds what requests still being received can hold.
 *
 * grpc-js reads a request into memory as it arrives and only hands it to a handler
 * once the client half-closes. A client that sends most of a large message and then
 * stops (or never half-closes) pins that memory for as long as the stream lives,
 * which without a client deadline is forever. This guard gives every call
 * `receiveTimeoutMs` to arrive in full and lets at most `maxReceiving` calls be
 * arriving at once; beyond either, the call gets a clear status and its HTTP/2 stream
 * is reset, which frees what it had buffered. Calls that arrived in full (within the
 * turn of the event loop that read their headers) are not counted: bounding work in
 * progress is the handlers' job (admission control).
 */
import type { ServerHttp2Stream } from 'node:http2';
import http2 from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { PatientTimer } from '../engine/abort.ts';
import type { Metrics } from '../observability/metrics.ts';
import { methodLabels } from './method-labels.ts';
import { grpcCodeName } from './grpc-status.ts';

export interface ReceiveLimits {
  /** Time a request has to arrive in full, from its headers to its half-close. */
  receiveTimeoutMs: number;
  /** Requests that may be arriving at once, over all connections. */
  maxReceiving: number;
}

/** How often a refusal is logged at most, so a flood does not flood the log too. */
const LOG_EVERY_MS = 10_000;

export function receiveGuard(limits: ReceiveLimits, metrics: Metrics, logger: Logger): grpc.ServerInterceptor {
  let receiving = 0;
  let lastLogged = 0;
  let refusedSinceLog = 0;
  const noteRefusal = (why: string) => {
    refusedSinceLog += 1;
    const now = Date.now();
    if (now - lastLogged < LOG_EVERY_MS) return;
    logger.warn({ refused: refusedSinceLog, receiving }, `refused requests: ${why}`);
    lastLogged = now;
    refusedSinceLog = 0;
  };

  return (descriptor, call) => {
    let timer: PatientTimer | undefined;
    let countLater: NodeJS.Immediate | undefined;
    let counted = false;
    const settle = () => {
      timer?.cancel();
      if (countLater) clearImmediate(countLater);
      timer = undefined;
      countLater = undefined;
      if (counted) receiving -= 1;
      counted = false;
    };
    const end = (code: grpc.status, details: string) => {
      settle();
      // Counted like any answer: the handler, which counts the others, never runs for this call.
      metrics.kmsRequests.inc({ ...methodLabels(descriptor.path), code: grpcCodeName(code) });
      call.sendStatus({ code, details });
      // The response is complete; reset the stream so the client stops sending and
      // grpc-js lets go of what it buffered (RFC 9113 8.1 allows exactly this).
      resetStream(call);
    };
    return new grpc.ServerInterceptingCall(call, {
      start(next) {
        // Patient (engine/abort.ts): when the plugin's own event loop is late, the rest of
        // the request may be sitting unread in the socket; that is not the client's delay.
        timer = new PatientTimer(() => {
          noteRefusal('request not received in time');
          end(grpc.status.DEADLINE_EXCEEDED, `request not received in full within ${limits.receiveTimeoutMs} ms`);
        }, limits.receiveTimeoutMs);
        // Counted only if it is still arriving after this turn of the event loop
        // (setImmediate runs after the reads of this turn): a request that came in full
        // with its headers, as every real one does, holds nothing worth bounding. A burst
        // of a thousand calls read at once on one connection must reach admission
        // control, which refuses what it cannot do with a clear "overloaded"; counted
        // at its headers, most of it would be refused here for being "received".
        countLater = setImmediate(() => {
          countLater = undefined;
          if (receiving >= limits.maxReceiving) {
            noteRefusal('too many requests being received at once');
            // An overload refusal like admission control's (UNAVAILABLE, "overloaded"): a
            // burst beyond this bound gets the same explicit answer wherever it is refused.
            end(grpc.status.UNAVAILABLE, `overloaded (receive): ${receiving} requests are being received at once; retry later`);
            return;
          }
          receiving += 1;
          counted = true;
        });
        next({
          onReceiveHalfClose(nextHalfClose) {
            settle();
            nextHalfClose();
          },
          onCancel() {
            settle();
          },
        });
      },
      sendStatus(status, nextStatus) {
        settle();
        nextStatus(status);
      },
    });
  };
}

/**
 * Reset the HTTP/2 stream under `call` right after its status was sent, in the same
 * turn of the event loop. A call answered before its request arrived in full (refused
 * by this guard or by admission control, kms/admission-gate.ts) must not stay open on
 * the server: grpc-go, given the answer while the rest of its request still waits for
 * flow-control window, drops that rest without a reset, so the stream would stay
 * half-open here forever, counted against the connection's stream bound; the client,
 * which counts it closed, then opens one stream too many and nghttp2 ends the whole
 * connection (GOAWAY PROTOCOL_ERROR "request HEADERS: max concurrent streams
 * exceeded"). Reset one loop turn later was not soon enough under a burst
 * (docs/design/overload.md). The response itself was already handed to nghttp2, which
 * sends it before the reset (RFC 9113 8.1 allows exactly this).
 *
 * grpc-js gives interceptors no handle on the stream, so this follows the calls'
 * `nextCall` fields to the innermost call and takes its `stream` field; if a grpc-js
 * upgrade renames them, the status is still sent and the stream lives until the client
 * or the connection limits end it (test/reliability/grpc-limits.test.ts measures the memory).
 */
export function resetStream(call: grpc.ServerInterceptingCallInterface): void {
  let inner = call as unknown as { nextCall?: unknown; stream?: ServerHttp2Stream };
  for (let depth = 0; inner.nextCall && depth < 8; depth++) inner = inner.nextCall;
  const stream = inner.stream;
  if (stream && typeof stream.close === 'function' && !stream.destroyed && !stream.closed) stream.close(http2.constants.NGHTTP2_NO_ERROR);
}
