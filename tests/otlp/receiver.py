#!/usr/bin/env python3
"""An OTLP/HTTP logs receiver for tests/tests/otlp.rs.

No OpenTelemetry collector installs on these machines, so this one decodes each
`POST /v1/logs` with the official protobuf classes of the PyPI package
`opentelemetry-proto` (ExportLogsServiceRequest: the real schema), writes every
log record it got as one JSON line to --out (and the raw request bodies to
--out + ".raw"), and answers a real ExportLogsServiceResponse. Over TLS with
--cert/--key; with --client-ca it requires a client certificate from that CA.
"""

import argparse
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        if self.path != "/v1/logs" or self.headers.get("content-type") != "application/x-protobuf":
            self.answer(404 if self.path != "/v1/logs" else 415, b"")
            return
        try:
            req = ExportLogsServiceRequest.FromString(body)
        except Exception as e:  # not the schema: a 400, as a collector answers
            sys.stderr.write(f"undecodable export: {e}\n")
            self.answer(400, b"")
            return
        with open(self.server.out + ".raw", "ab") as raw:
            raw.write(body)
        lines = []
        batch = sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
        for rl in req.resource_logs:
            res = attrs(rl.resource.attributes)
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    lines.append(json.dumps({
                        "resource": res,
                        "batch": batch,
                        "scope": sl.scope.name,
                        "time_unix_nano": r.time_unix_nano,
                        "observed_time_unix_nano": r.observed_time_unix_nano,
                        "severity_number": r.severity_number,
                        "severity_text": r.severity_text,
                        "body": value(r.body),
                        "attributes": attrs(r.attributes),
                        "headers": {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-")},
                    }))
        with open(self.server.out, "a") as out:
            for l in lines:
                out.write(l + "\n")
        self.answer(200, ExportLogsServiceResponse().SerializeToString())

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write((fmt % args) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.out = a.out
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    if a.client_ca:
        ctx.load_verify_locations(a.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    sys.stderr.write(f"listening on {a.listen}\n")
    sys.stderr.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()
