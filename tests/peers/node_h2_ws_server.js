#!/usr/bin/env node
// RFC 8441 (WebSockets over HTTP/2) echo server built on Node's own http2
// module, as a second, independent implementation next to scripts/wspeers/h2ws.py.
//
// Usage: node node_h2_ws_server.js <port|0> <cert.pem> <key.pem>
// Listens on 127.0.0.1 and prints "listening <port>" once ready.
// Extended CONNECT (:protocol websocket) gets :status 200 and a WebSocket
// echo; every other request gets 200 "ok".  Exits on SIGTERM.
'use strict';

const fs = require('node:fs');
const http2 = require('node:http2');

const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

const OPCODE = { CONTINUATION: 0x0, TEXT: 0x1, BINARY: 0x2, CLOSE: 0x8, PING: 0x9, PONG: 0xa };
const CLOSE_PROTOCOL_ERROR = 1002;
const CLOSE_TOO_BIG = 1009;

class WebSocketProtocolError extends Error {
  constructor(closeCode, message) {
    super(message);
    this.closeCode = closeCode;
  }
}

function encodeFrame(opcode, payload, fin = true) {
  // Server-to-client frames are never masked (RFC 6455 section 5.1).
  let header;
  if (payload.length < 126) {
    header = Buffer.from([(fin ? 0x80 : 0) | opcode, payload.length]);
  } else if (payload.length < 0x10000) {
    header = Buffer.alloc(4);
    header[0] = (fin ? 0x80 : 0) | opcode;
    header[1] = 126;
    header.writeUInt16BE(payload.length, 2);
  } else {
    header = Buffer.alloc(10);
    header[0] = (fin ? 0x80 : 0) | opcode;
    header[1] = 127;
    header.writeBigUInt64BE(BigInt(payload.length), 2);
  }
  return Buffer.concat([header, payload]);
}

function closePayload(code) {
  const payload = Buffer.alloc(2);
  payload.writeUInt16BE(code, 0);
  return payload;
}

// Parses one frame from the start of `buf`.  Returns {needed} when more bytes
// are required, or {frame, size} once the whole frame is there.
function parseFrame(buf) {
  if (buf.length < 2) return { needed: 2 };
  const fin = (buf[0] & 0x80) !== 0;
  const opcode = buf[0] & 0x0f;
  const masked = (buf[1] & 0x80) !== 0;
  let length = buf[1] & 0x7f;
  let offset = 2;
  if (length === 126) {
    if (buf.length < 4) return { needed: 4 };
    length = buf.readUInt16BE(2);
    offset = 4;
  } else if (length === 127) {
    if (buf.length < 10) return { needed: 10 };
    const bigLength = buf.readBigUInt64BE(2);
    if (bigLength > BigInt(MAX_MESSAGE_BYTES)) {
      throw new WebSocketProtocolError(CLOSE_TOO_BIG, 'frame too large');
    }
    length = Number(bigLength);
    offset = 10;
  }
  if (!masked) {
    throw new WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, 'client frames must be masked');
  }
  const maskOffset = offset;
  offset += 4;
  if (buf.length < offset + length) return { needed: offset + length };
  const payload = Buffer.from(buf.subarray(offset, offset + length)); // copy: we unmask in place
  for (let i = 0; i < payload.length; i++) payload[i] ^= buf[maskOffset + (i & 3)];
  return { frame: { fin, opcode, payload }, size: offset + length };
}

function runWebSocketEcho(stream) {
  // Received bytes are kept as a list of chunks and only joined once a whole
  // frame is there, so a 1 MB frame arriving in 16 KB DATA frames is not
  // copied over and over.
  let chunks = [];
  let buffered = 0;
  let needed = 2;
  let fragments = null; // {opcode, parts, size} while a fragmented message is open
  let closing = false;

  function send(opcode, payload) {
    if (!stream.writableEnded && !stream.destroyed) stream.write(encodeFrame(opcode, payload));
  }

  function finish(closeFrame) {
    closing = true;
    if (!stream.writableEnded && !stream.destroyed) stream.end(closeFrame);
  }

  function handleFrame({ fin, opcode, payload }) {
    if (opcode >= OPCODE.CLOSE && (!fin || payload.length > 125)) {
      throw new WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, 'malformed control frame');
    }
    switch (opcode) {
      case OPCODE.TEXT:
      case OPCODE.BINARY:
        if (fragments) throw new WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, 'expected a continuation frame');
        if (fin) send(opcode, payload);
        else fragments = { opcode, parts: [payload], size: payload.length };
        break;
      case OPCODE.CONTINUATION:
        if (!fragments) throw new WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, 'unexpected continuation frame');
        fragments.parts.push(payload);
        fragments.size += payload.length;
        if (fragments.size > MAX_MESSAGE_BYTES) throw new WebSocketProtocolError(CLOSE_TOO_BIG, 'message too large');
        if (fin) {
          send(fragments.opcode, Buffer.concat(fragments.parts));
          fragments = null;
        }
        break;
      case OPCODE.CLOSE:
        if (payload.length === 1) throw new WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, 'one-byte close payload');
        // Echo the status code (if any) and end our side of the stream.
        finish(encodeFrame(OPCODE.CLOSE, payload.subarray(0, 2)));
        break;
      case OPCODE.PING:
        send(OPCODE.PONG, payload);
        break;
      case OPCODE.PONG:
        break;
      default:
        throw new WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, `unknown opcode ${opcode}`);
    }
  }

  stream.on('data', (chunk) => {
    if (closing) return; // RFC 6455: nothing after Close is meaningful
    chunks.push(chunk);
    buffered += chunk.length;
    if (buffered < needed) return;
    let buf = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, buffered);
    try {
      while (!closing) {
        const result = parseFrame(buf);
        if (result.needed) {
          needed = result.needed;
          break;
        }
        buf = buf.subarray(result.size);
        needed = 2;
        handleFrame(result.frame);
      }
    } catch (err) {
      if (!(err instanceof WebSocketProtocolError)) throw err;
      finish(encodeFrame(OPCODE.CLOSE, closePayload(err.closeCode)));
    }
    chunks = buf.length ? [buf] : [];
    buffered = buf.length;
  });

  // The client's END_STREAM: end ours too.
  stream.on('end', () => finish());
}

function main() {
  const [portArg, certPath, keyPath] = process.argv.slice(2);
  if (portArg === undefined || !certPath || !keyPath) {
    console.error('usage: node node_h2_ws_server.js <port|0> <cert.pem> <key.pem>');
    process.exit(2);
  }

  const server = http2.createSecureServer({
    key: fs.readFileSync(keyPath),
    cert: fs.readFileSync(certPath),
    allowHTTP1: false,
    settings: { enableConnectProtocol: true },
  });

  server.on('stream', (stream, headers) => {
    // A peer's RST_STREAM surfaces as an 'error' on the stream; without a
    // listener Node would treat it as an uncaught exception and exit.
    stream.on('error', (err) => console.error(`stream ${stream.id}: ${err.message}`));
    if (headers[':method'] === 'CONNECT' && headers[':protocol'] === 'websocket') {
      stream.respond({ ':status': 200 });
      runWebSocketEcho(stream);
    } else {
      stream.respond({ ':status': 200, 'content-type': 'text/plain' });
      stream.end('ok');
    }
  });
  server.on('sessionError', (err) => console.error(`session error: ${err.message}`));

  server.listen(Number(portArg), '127.0.0.1', () => {
    console.log(`listening ${server.address().port}`);
  });

  process.on('SIGTERM', () => {
    server.close();
    process.exit(0);
  });
}

main();
