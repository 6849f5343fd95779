// One HTTP/2 session held open: GET --path once, then wait until the file --go
// exists and GET it again on the same session. Prints one JSON line per event
// (response, closed, goaway, error, done, timeout) so a test can tell whether the
// session was closed under it, and when.
import fs from 'node:fs';
import http2 from 'node:http2';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0 && dflt === undefined) throw new Error(`--${name} is required`);
  return i < 0 ? dflt : process.argv[i + 1];
};
const url = arg('url');
const path = arg('path');
const go = arg('go');
const timeout = Number(arg('timeout', '30'));
const say = (o) => console.log(JSON.stringify({ t: Date.now(), ...o }));

const session = http2.connect(url, { ca: fs.readFileSync(arg('ca')) });
session.on('goaway', (code) => say({ event: 'goaway', code }));
session.on('error', (e) => say({ event: 'error', message: e.message }));
session.on('close', () => {
  say({ event: 'closed' });
  process.exit(0);
});

function get(then) {
  const req = session.request({ ':path': path });
  let status = 0;
  req.on('response', (h) => { status = h[':status']; });
  req.on('error', (e) => say({ event: 'stream_error', message: e.message }));
  req.resume();
  req.on('end', () => {
    say({ event: 'response', status });
    then();
  });
  req.end();
}

get(() => {
  const wait = setInterval(() => {
    if (fs.existsSync(go)) {
      clearInterval(wait);
      get(() => {
        say({ event: 'done' });
        session.close();
      });
    }
  }, 50);
});
setTimeout(() => {
  say({ event: 'timeout' });
  process.exit(1);
}, timeout * 1000);
