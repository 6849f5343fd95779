"""Load through phigate: N concurrent keep-alive HTTPS clients (or, with --storm, a
new TLS connection per request) for a bounded time, plain asyncio + ssl (stdlib
only, so it runs anywhere the tests run). Prints one JSON line: requests sent,
responses received by status, errors, connections opened.

    python3 client.py --host 127.0.0.2 --port 9443 --ca ca.pem --path /json \
        --clients 1000 --secs 30 [--storm]
"""
import argparse
import asyncio
import json
import ssl
import time


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    chunked = False
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "connection" and value.lower() == "close":
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)
    return status, close


async def client(args, ctx, deadline, stats, start_gate):
    await start_gate.wait()
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        f"{'Connection: close' if args.storm else 'Connection: keep-alive'}\r\n\r\n"
    ).encode()
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port, ssl=ctx), 30
            )
        except Exception as e:  # noqa: BLE001 - every failure is counted and named
            stats["errors"].append(f"connect: {type(e).__name__}: {e}")
            await asyncio.sleep(0.1)
            continue
        stats["connections"] += 1
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                stats["sent"] += 1
                status, close = await asyncio.wait_for(read_response(reader), 30)
                stats["status"][str(status)] = stats["status"].get(str(status), 0) + 1
                if args.storm or close:
                    break
        except Exception as e:  # noqa: BLE001
            stats["errors"].append(f"exchange: {type(e).__name__}: {e}")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:  # noqa: BLE001 - the peer may already be gone
                pass


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--path", default="/json")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--secs", type=float, default=10)
    p.add_argument("--storm", action="store_true")
    args = p.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    stats = {"sent": 0, "status": {}, "errors": [], "connections": 0}
    gate = asyncio.Event()
    tasks = []
    deadline = time.monotonic() + args.secs
    for _ in range(args.clients):
        tasks.append(asyncio.create_task(client(args, ctx, deadline, stats, gate)))
    gate.set()
    await asyncio.gather(*tasks)
    stats["error_count"] = len(stats["errors"])
    # By phase and exception type ("connect: ConnectionRefusedError"), for tests
    # that inject faults and check which errors they caused.
    kinds = {}
    for e in stats["errors"]:
        k = ":".join(e.split(":")[:2])
        kinds[k] = kinds.get(k, 0) + 1
    stats["error_kinds"] = kinds
    stats["errors"] = stats["errors"][:20]
    print(json.dumps(stats))


asyncio.run(main())
