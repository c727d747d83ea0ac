/**
 * The one table from error code to gRPC status. Every error a handler returns goes
 * through `toGrpcError`, so no raw Node or SDK error (with its message and stack)
 * ever reaches a client: grpc-js would otherwise send it as UNKNOWN, verbatim.
 */
import { status, type ServiceError, Metadata } from '@grpc/grpc-js';
import { errorCodeOf, isTrousseauError, type ErrorCode } from '../errors.ts';

export const GRPC_STATUS_BY_CODE: Record<ErrorCode, status> = {
  INVALID_INPUT: status.INVALID_ARGUMENT,
  TAMPERED: status.INVALID_ARGUMENT,
  BACKEND_REJECTED: status.FAILED_PRECONDITION,
  BACKEND_UNAVAILABLE: status.UNAVAILABLE,
  BREAKER_OPEN: status.UNAVAILABLE,
  QUORUM_NOT_MET: status.UNAVAILABLE,
  NO_COPY_UNWRAPPED: status.UNAVAILABLE,
  DEADLINE: status.DEADLINE_EXCEEDED,
  CANCELLED: status.CANCELLED,
  CONFIG: status.INTERNAL,
  SHUTTING_DOWN: status.UNAVAILABLE,
  OVERLOADED: status.UNAVAILABLE,
  INTERNAL: status.INTERNAL,
};

/** Longest details string sent to a client. */
const MAX_DETAILS = 512;

export function toGrpcError(error: unknown): Partial<ServiceError> {
  const code = errorCodeOf(error);
  // TrousseauError messages are written to be safe; anything else is a bug whose text we do not trust.
  const details = isTrousseauError(error) && code !== 'INTERNAL' ? error.message.slice(0, MAX_DETAILS) : 'internal error';
  const metadata = new Metadata();
  metadata.set('trousseau-error-code', code);
  return { code: GRPC_STATUS_BY_CODE[code], details, metadata };
}

export function grpcCodeName(code: status): string {
  return status[code] ?? String(code);
}
