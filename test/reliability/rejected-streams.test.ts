/**
 * Issue 10, item 5 class: streams that Node's HTTP/2 layer refuses by itself must never
 * end the connection (src/kms/server.ts, MAX_SESSION_REJECTED_STREAMS).
 *
 * Node refuses a new stream with RST_STREAM ENHANCE_YOUR_CALM when its own table of the
 * connection's streams is full, and it drops a closed stream from that table only on
 * the next turn of its event loop, while nghttp2 (which enforces the advertised
 * MAX_CONCURRENT_STREAMS) counts it closed at once. Under a burst grpc-go opens a stream
 * the moment one closes, and again the moment that one is refused, so on a busy event
 * loop the refusals come in runs; after more than 100 in a row (Node's default; the
 * count restarts whenever a stream is accepted) Node ends the connection with GOAWAY
 * INTERNAL_ERROR, failing every call on it: the apiserver's one connection.
 *
 * test/k8s/burst_test.go provokes the race the way the apiserver does, but whether a
 * run of 100 happens there depends on the machine. Here it is provoked on purpose,
 * every time, with HTTP/2 frames written by hand: with the connection at its stream
 * bound, 120 pairs of (a client reset of an open stream, the HEADERS of a new one) in
 * one write. Each reset frees a slot in nghttp2's count at once and in Node's table only
 * after the write is processed, so all 120 new streams are refused in a row. The
 * connection must then still answer and take a new stream. Without the setting Node
 * ends it after the 101st refusal.
 */
import test from 'ava';
import net from 'node:net';
import { spawnLocalServe } from '../helpers/plugin-harness.ts';

/** Streams held open by the test: more than Node's 100 allowed refusals in a row. */
const STREAM_BOUND = 128;
const REFUSALS = 120;

const FRAME = { DATA: 0x0, HEADERS: 0x1, RST_STREAM: 0x3, SETTINGS: 0x4, PING: 0x6, GOAWAY: 0x7 } as const;
const FLAG = { END_STREAM: 0x1, ACK: 0x1, END_HEADERS: 0x4 } as const;
const ERROR = { CANCEL: 0x8, ENHANCE_YOUR_CALM: 0xb } as const;

function frame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header.writeUInt8(type, 3);
  header.writeUInt8(flags, 4);
  header.writeUInt32BE(streamId & 0x7fffffff, 5);
  return Buffer.concat([header, payload]);
}

/** An HPACK literal header field without indexing, new name (RFC 7541, 6.2.2); every string here is under 127 bytes. */
function literal(name: string, value: string): Buffer {
  return Buffer.concat([Buffer.from([0x00, name.length]), Buffer.from(name), Buffer.from([value.length]), Buffer.from(value)]);
}

/** The HEADERS of a v2 Status call whose request never comes: the stream stays open. */
function openStatusCall(streamId: number): Buffer {
  const block = Buffer.concat([
    literal(':method', 'POST'),
    literal(':scheme', 'http'),
    literal(':path', '/v2.KeyManagementService/Status'),
    literal(':authority', 'localhost'),
    literal('content-type', 'application/grpc'),
    literal('te', 'trailers'),
  ]);
  return frame(FRAME.HEADERS, FLAG.END_HEADERS, streamId, block);
}

function rstStream(streamId: number, code: number): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(code);
  return frame(FRAME.RST_STREAM, 0, streamId, payload);
}

/** A raw HTTP/2 client connection that records the frames the server sends. */
class RawConnection {
  readonly refused = new Set<number>();
  goaway: { code: number } | undefined;
  private readonly socket: net.Socket;
  private buffered = Buffer.alloc(0);
  private pings = new Map<string, () => void>();
  private pingCount = 0;
  private closed = false;

  constructor(socketPath: string) {
    this.socket = net.connect(socketPath);
    this.socket.on('data', (chunk: Buffer) => this.receive(chunk));
    this.socket.on('close', () => {
      this.closed = true;
      for (const done of this.pings.values()) done();
    });
    this.socket.on('error', () => undefined);
  }

  async handshake(): Promise<void> {
    await new Promise<void>((resolve, reject) => this.socket.once('connect', resolve).once('error', reject));
    this.socket.write(Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), frame(FRAME.SETTINGS, 0, 0)]));
  }

  write(...frames: Buffer[]): void {
    this.socket.write(Buffer.concat(frames));
  }

  /**
   * Resolves once the server has answered a PING sent after everything written so far:
   * it has read and processed all of it (nghttp2 answers frames in order). True while
   * the connection is alive.
   */
  async sync(): Promise<boolean> {
    if (this.closed) return false;
    const data = Buffer.alloc(8);
    data.writeUInt32BE(++this.pingCount);
    const answered = new Promise<void>((resolve) => this.pings.set(data.toString('hex'), resolve));
    this.write(frame(FRAME.PING, 0, 0, data));
    await answered;
    return !this.closed && this.goaway === undefined;
  }

  close(): void {
    this.socket.destroy();
  }

  private receive(chunk: Buffer): void {
    this.buffered = Buffer.concat([this.buffered, chunk]);
    while (this.buffered.length >= 9) {
      const length = this.buffered.readUIntBE(0, 3);
      if (this.buffered.length < 9 + length) return;
      const type = this.buffered.readUInt8(3);
      const flags = this.buffered.readUInt8(4);
      const streamId = this.buffered.readUInt32BE(5) & 0x7fffffff;
      const payload = this.buffered.subarray(9, 9 + length);
      this.buffered = this.buffered.subarray(9 + length);
      if (type === FRAME.SETTINGS && !(flags & FLAG.ACK)) this.write(frame(FRAME.SETTINGS, FLAG.ACK, 0));
      if (type === FRAME.PING && flags & FLAG.ACK) {
        const key = payload.toString('hex');
        this.pings.get(key)?.();
        this.pings.delete(key);
      }
      if (type === FRAME.RST_STREAM && payload.readUInt32BE(0) === ERROR.ENHANCE_YOUR_CALM) this.refused.add(streamId);
      if (type === FRAME.GOAWAY) {
        this.goaway = { code: payload.readUInt32BE(4) };
        for (const done of this.pings.values()) done();
      }
    }
  }
}

test('120 streams in a row refused by Node itself do not end the connection', async (t) => {
  t.timeout(60_000);
  const { socketPath } = await spawnLocalServe(t, { connections: { maxConcurrentStreams: STREAM_BOUND }, log: { level: 'warn' } });

  const connection = new RawConnection(socketPath);
  t.teardown(() => connection.close());
  await connection.handshake();
  // The server's SETTINGS (the stream bound) apply once acknowledged, and the ACK is
  // written when they arrive: after this PING's answer they are in force.
  t.true(await connection.sync());

  let nextId = 1;
  const open: number[] = [];
  const openOne = () => {
    open.push(nextId);
    connection.write(openStatusCall(nextId));
    nextId += 2;
  };
  for (let i = 0; i < STREAM_BOUND; i++) openOne();
  t.true(await connection.sync(), 'the connection takes its stream bound');
  t.is(connection.refused.size, 0);

  // One write: each reset frees a slot in nghttp2's count at once but in Node's table
  // only a turn later, so the HEADERS after it is refused by Node, and the next one too:
  // REFUSALS refusals in a row, with no stream accepted between them.
  const frames: Buffer[] = [];
  const candidates: number[] = [];
  for (let i = 0; i < REFUSALS; i++) {
    frames.push(rstStream(open.shift()!, ERROR.CANCEL), openStatusCall(nextId));
    candidates.push(nextId);
    nextId += 2;
  }
  connection.write(...frames);
  const alive = await connection.sync();
  const refused = candidates.filter((id) => connection.refused.has(id)).length;
  t.log(`${refused} of ${REFUSALS} streams refused by Node in a row; GOAWAY: ${connection.goaway ? `code ${connection.goaway.code}` : 'none'}`);
  t.true(refused > 100, `the race was provoked past Node's default of 100 refusals in a row (${refused})`);
  t.is(connection.goaway, undefined, 'the server never ended the connection');
  t.true(alive, 'the connection still answers');
  // And it takes a new stream once Node's table has caught up.
  const last = nextId;
  openOne();
  t.true(await connection.sync(), 'the connection still answers');
  t.false(connection.refused.has(last), 'a new stream is accepted again');
});
