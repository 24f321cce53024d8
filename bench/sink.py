#!/usr/bin/env python3
"""A minimal tus 1.0.0 sink for benchmarks: it keeps no bytes, only counts them.

Why it exists: the sandbox is strict and stores every byte on disk, so it
measures hotfolder *and* a server's disk. This sink answers the few requests
the tus core protocol needs (OPTIONS, POST creation, HEAD, PATCH, DELETE) and
throws the body away, so what remains is the client's own speed. It offers no
checksum extension, like the simplest tus servers.

It also notes, per upload, when the first and the last body byte arrived
(wall clock, seconds since the epoch), which the benchmark reads from
`GET /stats` to measure detection latency.

    bench/sink.py            # prints "sink listening on http://127.0.0.1:PORT/files/"
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECE = 1 << 20

uploads = {}
uploads_lock = threading.Lock()
next_id = [1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def reply(self, status, headers=(), body=b""):
        self.send_response(status)
        self.send_header("Tus-Resumable", "1.0.0")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def upload(self):
        key = self.path.rsplit("/", 1)[-1]
        with uploads_lock:
            return key, uploads.get(key)

    def do_OPTIONS(self):
        self.reply(204, [("Tus-Version", "1.0.0"), ("Tus-Extension", "creation,termination")])

    def do_POST(self):
        length = int(self.headers.get("Upload-Length", "-1"))
        if length < 0:
            self.reply(400, body=b"Upload-Length required")
            return
        with uploads_lock:
            key = str(next_id[0])
            next_id[0] += 1
            uploads[key] = {"length": length, "offset": 0, "first_byte": None, "last_byte": None}
        self.reply(201, [("Location", f"/files/{key}")])

    def do_HEAD(self):
        key, upload = self.upload()
        if upload is None:
            self.reply(404)
            return
        self.reply(
            200,
            [
                ("Upload-Offset", str(upload["offset"])),
                ("Upload-Length", str(upload["length"])),
                ("Cache-Control", "no-store"),
            ],
        )

    def do_PATCH(self):
        key, upload = self.upload()
        length = int(self.headers.get("Content-Length", "0"))
        offset = int(self.headers.get("Upload-Offset", "-1"))
        if upload is None or offset != upload["offset"]:
            self.close_connection = True  # the body is not read
            self.reply(404 if upload is None else 409)
            return
        buffer = memoryview(bytearray(PIECE))
        received = 0
        while received < length:
            n = self.rfile.readinto(buffer[: min(PIECE, length - received)])
            if not n:
                break
            if upload["first_byte"] is None:
                upload["first_byte"] = time.time()
            received += n
            upload["offset"] += n
        upload["last_byte"] = time.time()
        if received < length:
            self.close_connection = True
            return
        self.reply(204, [("Upload-Offset", str(upload["offset"]))])

    def do_DELETE(self):
        key, upload = self.upload()
        with uploads_lock:
            uploads.pop(key, None)
        self.reply(204 if upload else 404)

    def do_GET(self):
        if self.path != "/stats":
            self.reply(404)
            return
        with uploads_lock:
            body = json.dumps(uploads).encode()
        self.reply(200, [("Content-Type", "application/json")], body)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    print(f"sink listening on http://127.0.0.1:{port}/files/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
