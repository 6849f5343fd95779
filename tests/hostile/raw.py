#!/usr/bin/env python3
"""A raw client for phigate's hostile-input tests: sends exact bytes (over TLS or
not), optionally trickled, and reports what came back as one JSON line.

  raw.py --connect HOST:PORT [--tls --ca CA --sni NAME --alpn http/1.1]
         [--trickle-ms N] [--read-secs S] PAYLOAD

PAYLOAD is a Python bytes literal body (escapes like \\r\\n and \\xff allowed).
Prints {"statuses": [...], "received": n, "closed_by_peer": bool, "seconds": s,
"error": str|null, "tls_error": str|null}.
"""
import argparse
import ast
import json
import re
import socket
import ssl
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--ca")
    ap.add_argument("--sni")
    ap.add_argument("--alpn", default="http/1.1")
    ap.add_argument("--trickle-ms", type=int, default=0,
                    help="send one byte per N ms (slowloris)")
    ap.add_argument("--read-secs", type=float, default=5.0)
    ap.add_argument("payload")
    a = ap.parse_args()
    payload = ast.literal_eval("b'''" + a.payload + "'''")
    host, port = a.connect.rsplit(":", 1)
    out = {"statuses": [], "received": 0, "closed_by_peer": False, "error": None,
           "tls_error": None}
    t0 = time.monotonic()
    s = socket.create_connection((host, int(port)), timeout=a.read_secs)
    try:
        if a.tls:
            ctx = ssl.create_default_context(cafile=a.ca)
            ctx.set_alpn_protocols([a.alpn])
            try:
                s = ctx.wrap_socket(s, server_hostname=a.sni or host)
            except (ssl.SSLError, OSError) as e:
                out["tls_error"] = str(e)
                raise SystemExit(report(out, t0))
        try:
            if a.trickle_ms:
                for i in range(len(payload)):
                    s.sendall(payload[i:i + 1])
                    time.sleep(a.trickle_ms / 1000)
            else:
                s.sendall(payload)
        except OSError as e:
            # The peer closing while we still send is what a refused slow client sees.
            out["error"] = "send: " + str(e)
            out["closed_by_peer"] = True
        data = b""
        deadline = time.monotonic() + a.read_secs
        while not out["closed_by_peer"] and time.monotonic() < deadline:
            try:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except (OSError, ssl.SSLError) as e:
                out["error"] = "recv: " + str(e)
                out["closed_by_peer"] = True
                break
            if not chunk:
                out["closed_by_peer"] = True
                break
            data += chunk
        out["received"] = len(data)
        out["statuses"] = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
        out["bodies"] = [b.decode("latin-1")[:300] for b in re.split(rb"HTTP/1\.1 \d{3} ", data)[1:]]
    finally:
        s.close()
    report(out, t0)


def report(out, t0):
    out["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    main()
