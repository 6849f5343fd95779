"""Idle keep-alive TLS clients, for `cargo xtask bench rss`: opens N HTTPS
connections (at most --parallel handshakes at a time), sends one keep-alive GET on
each and reads the answer whole, then holds every connection open and idle. Prints
one JSON line once all are established ({"open": n, "ok": n, "errors": [...]}) and
keeps them until stdin closes, so the caller can measure the proxy's memory while
they are held. Standard library only.

    python3 idle.py --host 127.0.0.2 --port 9443 --path /1k.json --conns 1000
"""
import argparse
import asyncio
import json
import ssl
import sys


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def one(args, ctx, gate, held, stats):
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port, ssl=ctx), 60
            )
            writer.write(request)
            await writer.drain()
            status = await asyncio.wait_for(read_response(reader), 60)
        except Exception as e:  # noqa: BLE001 - every failure is counted and named
            stats["errors"].append(f"{type(e).__name__}: {e}")
            return
    held.append((reader, writer))
    if status == 200:
        stats["ok"] += 1


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/1k.json")
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--parallel", type=int, default=64)
    args = p.parse_args()
    # Like wrk, the bench client does not verify: it measures the proxies, whose
    # own upstream verification is on.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(args.parallel)
    held, stats = [], {"ok": 0, "errors": []}
    await asyncio.gather(*(one(args, ctx, gate, held, stats) for _ in range(args.conns)))
    errors = stats["errors"]
    print(
        json.dumps({"open": len(held), "ok": stats["ok"], "errors": errors[:5], "error_count": len(errors)}),
        flush=True,
    )
    # Hold them, idle, until the caller closes stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
