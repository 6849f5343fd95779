#!/usr/bin/python3
"""An unprivileged process on a protected host trying to get around phigate.

Run by the boundary e2e tests (tests/tests/boundary.rs) as a real unprivileged user,
inside the protected cgroup. Each mode prints one JSON line saying what it achieved;
the tests assert on it. Nothing here knows phigate's internals beyond what any local
user can read in the docs (the listen port, the default socket mark).
"""
import argparse
import ctypes
import errno
import json
import socket
import threading
import time

SO_MARK = 36
PR_SET_NAME = 15


def say(**kw):
    print(json.dumps(kw), flush=True)


def http_get(s, host):
    s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\nAuthorization: Bearer stolen\r\n\r\n")
    data = b""
    s.settimeout(5)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data.decode(errors="replace")


def hijack(args):
    """Bind the agent's listen address whenever it is free (a restart gap), accept
    whatever arrives and count it; stop after --secs."""
    deadline = time.time() + args.secs
    got = []
    bound_at = None
    sock = None
    while time.time() < deadline:
        if sock is None:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((args.host, args.port))
                s.listen(128)
                s.settimeout(0.05)
                sock = s
                bound_at = time.time()
                say(event="bound", port=args.port)
            except OSError:
                s.close()
                time.sleep(0.005)
                continue
        try:
            c, peer = sock.accept()
        except socket.timeout:
            continue
        c.settimeout(0.5)
        try:
            first = c.recv(4096)
        except OSError:
            first = b""
        got.append({"peer": "%s:%d" % peer, "bytes": len(first), "head": first[:40].decode(errors="replace")})
        c.close()
    if sock:
        sock.close()
    say(mode="hijack", bound=bound_at is not None, received=len(got), connections=got)


def marked(args):
    """Set phigate's socket mark (needs only CAP_NET_RAW) and call the API."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
    try:
        s.connect((args.host, args.port))
    except OSError as e:
        say(mode="marked", connected=False, error=e.strerror)
        return
    say(mode="marked", connected=True, mark=s.getsockopt(socket.SOL_SOCKET, SO_MARK), response=http_get(s, args.host))


def connect_from(args):
    """Connect to HOST:PORT from a chosen source port; with --reset, close with an RST
    right after the handshake (a connection that dies in the agent's backlog)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", args.sport))
    try:
        s.connect((args.host, args.port))
    except OSError as e:
        say(mode="connect_from", connected=False, error=e.strerror)
        return
    if args.reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        say(mode="connect_from", connected=True, reset=True)
        return
    say(mode="connect_from", connected=True, response=http_get(s, args.host))


def renamed_thread(args):
    """Connect from a thread with a name of its own (prctl), as io_uring workers and
    thread pools have."""
    out = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, b"not-my-exe", 0, 0, 0)
        s = socket.create_connection((args.host, args.port), timeout=5)
        out["response"] = http_get(s, args.host)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    say(mode="renamed_thread", **out)


def flood(args):
    """Connect straight to the agent's listener many times."""
    refused = 0
    for _ in range(args.count):
        try:
            s = socket.create_connection((args.host, args.port), timeout=2)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(2)
            try:
                s.recv(10)
            except OSError:
                pass
            s.close()
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                refused += 1
    say(mode="flood", count=args.count, refused=refused)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("hijack")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, default=15001)
    h.add_argument("--secs", type=float, default=5)
    m = sub.add_parser("marked")
    m.add_argument("--mark", type=lambda x: int(x, 0), required=True)
    m.add_argument("--host", required=True)
    m.add_argument("--port", type=int, required=True)
    c = sub.add_parser("connect_from")
    c.add_argument("--sport", type=int, required=True)
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--reset", action="store_true")
    r = sub.add_parser("renamed_thread")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, required=True)
    f = sub.add_parser("flood")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=15001)
    f.add_argument("--count", type=int, default=200)
    a = p.parse_args()
    {"hijack": hijack, "marked": marked, "connect_from": connect_from,
     "renamed_thread": renamed_thread, "flood": flood}[a.mode](a)


if __name__ == "__main__":
    main()
