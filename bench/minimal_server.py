#!/usr/bin/env python3
"""The floor of an asyncio server on a Unix socket: a Protocol that answers every line with
one fixed JSON line (the size of a get_status reply) and does nothing else. bench_core.py
measures the daemon against it with the same client processes in the same run.

    python bench/minimal_server.py SOCKET_PATH
"""
import asyncio
import os
import sys

REPLY = (b'{"correlation_id":"5f0c2a8e-3b1d-4c6e-9a7f-1e2d3c4b5a69","success":true,"data":'
         b'{"version":"0","public_key":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx pulse-sensor-proxy",'
         b'"uptime_seconds":1.0}}\n')


class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while b"\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\n")
            self.transport.write(REPLY)


async def serve(path):
    server = await asyncio.get_running_loop().create_unix_server(Answer, path, backlog=512)
    os.chmod(path, 0o666)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
