// A real HTTPS (HTTP/2 + HTTP/1.1) or plain HTTP upstream for phigate's end-to-end
// tests and benchmarks. Node built-ins only.
//
//   node server.js --host 127.0.0.2 --port 9443 --cert c.pem --key k.pem [--plain | --h1only]
//
// Routes:
//   GET  /json?bytes=N     JSON document of about N bytes (FHIR-like Bundle)
//   GET  /stream?bytes=N   N bytes of octet-stream, in 64 KiB chunks
//   POST /upload           consumes the body; answers {"received": n, "sha256": hex}
//   GET  /headers          the request's headers as JSON
//   GET  /trailers         a body followed by trailers x-checksum
//   GET  /slow?ms=N        answers after N ms
//   GET  /stats            {"connections": n, "requests": n}
//   GET  /fhir/TYPE/ID     --files DIR's TYPE-ID.json (TYPE-export.ndjson for $export)
//   GET  /files/NAME       a file of --files DIR; content type by extension (.json:
//                          application/fhir+json, .ndjson: application/fhir+ndjson,
//                          .xml: application/fhir+xml, else text/plain); ?gzip=1 / ?br=1 encoded; ?chunked=1
//                          without content-length; etag "v1"; `Range: bytes=A-B`
//                          answered 206 with that slice (as static file servers do),
//                          and ?partial=A-B answers 206 whatever the request says;
//                          ?chunked=1&pause_after=N&pause_ms=M pauses after N bytes
//   Upgrade: websocket-ish  101, then echoes bytes back
//   --record FILE          appends every request it receives as a JSON line
//                          {"method", "path", "headers"}, so a test sees what reached
//                          the upstream (not what the client was shown)
//   --client-ca FILE       TLS: refuses a client without a certificate this CA issued
// Every response carries x-upstream-proto (h2 | http/1.1) and x-upstream-conn (a
// per-connection id, to check keep-alive reuse).
'use strict';
const http = require('http');
const http2 = require('http2');
const https = require('https');
const fs = require('fs');
const crypto = require('crypto');

const args = {};
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a.startsWith('--')) {
    const k = a.slice(2);
    const v = process.argv[i + 1] && !process.argv[i + 1].startsWith('--') ? process.argv[++i] : true;
    args[k] = v;
  }
}
const host = args.host || '127.0.0.2';
const port = Number(args.port || 9443);

let connections = 0;
let requests = 0;

function jsonDoc(bytes) {
  const entries = [];
  let size = 0;
  let i = 0;
  while (size < bytes) {
    const e = {
      resource: {
        resourceType: 'Patient',
        id: `p${i}`,
        name: [{ family: `Family${i}`, given: [`Given${i}`] }],
        birthDate: '1970-01-01',
        telecom: [{ system: 'phone', value: '555-0100' }],
      },
    };
    const s = JSON.stringify(e);
    size += s.length + 1;
    entries.push(e);
    i++;
  }
  return JSON.stringify({ resourceType: 'Bundle', type: 'searchset', total: entries.length, entry: entries });
}

function handler(req, res) {
  requests++;
  if (args.record) {
    fs.appendFileSync(args.record, JSON.stringify({ method: req.method, path: req.url, headers: req.headers }) + '\n');
  }
  const proto = req.httpVersionMajor === 2 ? 'h2' : 'http/1.1';
  // The client port identifies the connection: same port, same (reused) connection.
  const connId = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
  res.setHeader('x-upstream-proto', proto);
  res.setHeader('x-upstream-conn', String(connId));
  const url = new URL(req.url, 'http://x');
  const q = (k, d) => Number(url.searchParams.get(k) || d);
  switch (url.pathname) {
    case '/json': {
      const body = jsonDoc(q('bytes', 1024));
      res.setHeader('content-type', 'application/fhir+json');
      res.setHeader('content-length', Buffer.byteLength(body));
      res.end(body);
      return;
    }
    case '/stream': {
      let left = q('bytes', 1 << 20);
      const chunk = Buffer.alloc(64 * 1024, 0x61);
      res.setHeader('content-type', 'application/octet-stream');
      res.setHeader('content-length', String(left));
      const pump = () => {
        while (left > 0) {
          const n = Math.min(left, chunk.length);
          left -= n;
          if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
            res.once('drain', pump);
            return;
          }
        }
        res.end();
      };
      pump();
      return;
    }
    case '/upload': {
      const h = crypto.createHash('sha256');
      let n = 0;
      req.on('data', (d) => { n += d.length; h.update(d); });
      req.on('end', () => {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ received: n, sha256: h.digest('hex') }));
      });
      return;
    }
    case '/headers': {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(req.headers));
      return;
    }
    case '/trailers': {
      res.setHeader('content-type', 'text/plain');
      res.setHeader('trailer', 'x-checksum');
      res.write('body-with-trailers');
      res.addTrailers({ 'x-checksum': 'abc123' });
      res.end();
      return;
    }
    case '/slow': {
      setTimeout(() => res.end('slow'), q('ms', 1000));
      return;
    }
    case '/stats': {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ connections, requests }));
      return;
    }
    default:
      break;
  }
  // A FHIR-shaped view of --files: /fhir/Patient/123 -> Patient-123.json,
  // /fhir/Patient/$export -> Patient-export.ndjson.
  let fhirName = null;
  if (url.pathname.startsWith('/fhir/') && args.files) {
    const rest = url.pathname.slice('/fhir/'.length).replace(/\$/g, '').split('/').join('-');
    fhirName = rest.endsWith('export') ? `${rest}.ndjson` : `${rest}.json`;
  }
  if ((url.pathname.startsWith('/files/') || fhirName) && args.files) {
    const name = (fhirName || url.pathname.slice('/files/'.length)).replace(/[^A-Za-z0-9._-]/g, '');
    let body;
    try { body = fs.readFileSync(require('path').join(args.files, name)); } catch (e) {
      res.statusCode = 404; res.end('no such file'); return;
    }
    const type = name.endsWith('.ndjson') ? 'application/fhir+ndjson'
      : name.endsWith('.json') ? 'application/fhir+json'
      : name.endsWith('.xml') ? 'application/fhir+xml' : 'text/plain';
    res.setHeader('content-type', type);
    res.setHeader('etag', '"v1"');
    if (url.searchParams.get('gzip')) {
      body = require('zlib').gzipSync(body);
      res.setHeader('content-encoding', 'gzip');
    } else if (url.searchParams.get('br')) {
      body = require('zlib').brotliCompressSync(body);
      res.setHeader('content-encoding', 'br');
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(url.searchParams.get('partial') ? 'bytes=' + url.searchParams.get('partial') : (req.headers.range || ''));
    if (range) {
      const start = Number(range[1]);
      const end = Math.min(Number(range[2]), body.length - 1);
      res.statusCode = 206;
      res.setHeader('content-range', `bytes ${start}-${end}/${body.length}`);
      res.setHeader('x-upstream-range', req.headers.range || '');
      body = body.subarray(start, end + 1);
    }
    if (url.searchParams.get('chunked')) {
      // Several writes, no length: the body streams. ?pause_after=N&pause_ms=M:
      // the first N bytes, then M ms of nothing, then the rest.
      const pauseAfter = q('pause_after', 0);
      const write = (from, to) => {
        for (let i = from; i < to; i += 7919) res.write(body.subarray(i, Math.min(i + 7919, to)));
      };
      if (pauseAfter > 0) {
        write(0, Math.min(pauseAfter, body.length));
        setTimeout(() => { write(Math.min(pauseAfter, body.length), body.length); res.end(); }, q('pause_ms', 1000));
      } else {
        write(0, body.length);
        res.end();
      }
    } else {
      res.setHeader('content-length', body.length);
      res.end(body);
    }
    return;
  }
  switch (url.pathname) {
    case '/stats-unused': {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ connections, requests }));
      return;
    }
    default:
      res.statusCode = 404;
      res.end('not found');
  }
}

function onUpgrade(req, socket, head) {
  // A WebSocket client checks the handshake (RFC 6455 4.2.2); then every byte is
  // echoed back as it came (a client's masked frame returns masked).
  const key = req.headers['sec-websocket-key'];
  const accept = key
    ? 'Sec-WebSocket-Accept: ' + crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64') + '\r\n'
    : '';
  socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: ' + (req.headers.upgrade || 'echo') + '\r\nConnection: Upgrade\r\n' + accept + '\r\n');
  if (head && head.length) socket.write(head);
  socket.pipe(socket);
}

// --client-ca: mutual TLS, a handshake without a certificate of that CA fails.
const clientAuth = args['client-ca']
  ? { ca: fs.readFileSync(args['client-ca']), requestCert: true, rejectUnauthorized: true }
  : {};
let server;
if (args.plain) {
  server = http.createServer(handler);
} else if (args.h1only) {
  // HTTP/1.1 only: Node's http2 server does not emit 'upgrade' for HTTP/1 clients.
  server = https.createServer({ cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key), ...clientAuth }, handler);
  server.on('secureConnection', () => { connections++; });
} else {
  server = http2.createSecureServer({
    cert: fs.readFileSync(args.cert),
    key: fs.readFileSync(args.key),
    allowHTTP1: true,
    ALPNProtocols: ['h2', 'http/1.1'],
    ...clientAuth,
  }, handler);
  server.on('secureConnection', () => { connections++; });
}
if (args.plain) server.on('connection', () => { connections++; });
server.on('upgrade', onUpgrade);
server.keepAliveTimeout = 60000;
server.listen(port, host, () => {
  process.stdout.write(`listening ${host}:${port}\n`);
});
