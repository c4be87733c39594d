"""Stand-in for Pulse's `POST /api/temperature-proxy/register` (Pulse v4.31..v5.0.17), as the
proxy's installer meets it. Written from the described behaviour:

* request body {"hostname": "<node name>", "proxy_url": "https://...:8443", "mode": "http"};
* 200 {"success": true, "token": "<32 random bytes, URL-safe base64, 44 chars>",
  "pve_instance": "<name>"} when a PVE instance in Pulse matches the hostname;
* 404 {"error": "pve_instance_not_found"} when none does;
* 410 on Pulse releases whose proxy endpoints are switched off.

usage: pulse_register_fixture.py PORT STATE_DIR (gone | NODE=INSTANCE ...)
Every request body is appended to STATE_DIR/requests.jsonl, every token answered to
STATE_DIR/tokens; STATE_DIR/ready appears once the port accepts.
"""
import base64
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

PORT, STATE = int(sys.argv[1]), sys.argv[2]
GONE = sys.argv[3:] == ["gone"]
INSTANCES = dict(arg.split("=", 1) for arg in sys.argv[3:] if not GONE)


class Register(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(os.path.join(STATE, "requests.jsonl"), "ab") as log:
            log.write(body + b"\n")
        if self.path != "/api/temperature-proxy/register":
            return self.answer(404, {"error": "not found"})
        if GONE:
            return self.answer(410, {"error": "temperature proxy endpoints are disabled"})
        request = json.loads(body)
        instance = INSTANCES.get(request.get("hostname"))
        if instance is None or request.get("mode") != "http":
            return self.answer(404, {"error": "pve_instance_not_found"})
        token = base64.urlsafe_b64encode(os.urandom(32)).decode()
        with open(os.path.join(STATE, "tokens"), "a") as tokens:
            tokens.write(token + "\n")
        self.answer(200, {"success": True, "token": token, "pve_instance": instance})

    def answer(self, status, data):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = HTTPServer(("127.0.0.1", PORT), Register)
open(os.path.join(STATE, "ready"), "w").close()
server.serve_forever()
