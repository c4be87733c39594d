#!/usr/bin/env python3
"""Hostile peers for the campaign tests and bench/bench_campaign.py.

Standard library only, so it runs under any uid. Each mode prints one JSON object.

    hostile_peer.py flood SOCKET TOTAL THREADS
        TOTAL get_status requests as fast as possible from ONE pid (THREADS keep-alive
        connections); prints {"served": n, "<error>": n, ...}. Prints "flooding" first.
    hostile_peer.py flood-connect SOCKET TOTAL THREADS
        The same, but every request on a new connection, as Pulse sends them.
    hostile_peer.py pids SOCKET COUNT PARALLEL
        COUNT get_status requests, each from a new process (PARALLEL at a time); prints
        {"served": n, "failed": n, "distinct_pids": n}.
    hostile_peer.py pipeline SOCKET TOTAL 1
        TOTAL `{"method":"x"}` lines pipelined on ONE keep-alive connection as fast as the
        socket takes them, the answers read by a second thread; prints "flooding" first, then
        {"<error>": n, ...} of the answers.
    hostile_peer.py stall SOCKET COUNT LINES
        COUNT connections (4 KiB receive buffer) each sending LINES pipelined get_status lines
        and never reading; prints "stalled" once all are sent, then waits until the daemon has
        closed every one and prints {"closed": n}.
"""
import select
import json
import os
import socket
import sys
import threading

REQUEST = b'{"method":"get_status"}\n'


def read_line(sock, buffer):
    while b"\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the daemon")
        buffer += chunk
    return buffer.partition(b"\n")


def flood(path, total, threads, keep_alive=True):
    counts, lock = {}, threading.Lock()

    def ask(sock, buffer):
        sock.sendall(REQUEST)
        line, _, buffer = read_line(sock, buffer)
        reply = json.loads(line)
        key = "served" if reply["success"] else reply["error"]
        with lock:
            counts[key] = counts.get(key, 0) + 1
        return buffer

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(path)
        return sock

    def worker(count):
        if keep_alive:
            with connect() as sock:
                buffer = b""
                for _ in range(count):
                    buffer = ask(sock, buffer)
        else:
            for _ in range(count):
                with connect() as sock:
                    ask(sock, b"")

    workers = [threading.Thread(target=worker, args=(total // threads,)) for _ in range(threads)]
    print("flooding", flush=True)
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return counts


def one_request_as_child(path):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(REQUEST)
            reply = json.loads(read_line(sock, b"")[0])
        os._exit(0 if reply["success"] and reply["data"]["peer"]["pid"] == os.getpid() else 1)
    except BaseException:
        os._exit(2)


def many_pids(path, count, parallel):
    served = failed = 0
    pids = set()
    running = 0
    for _ in range(count):
        if running >= parallel:
            _, status = os.wait()
            running -= 1
            served, failed = (served + 1, failed) if status == 0 else (served, failed + 1)
        pid = os.fork()
        if pid == 0:
            one_request_as_child(path)
        pids.add(pid)
        running += 1
    for _ in range(running):
        _, status = os.wait()
        served, failed = (served + 1, failed) if status == 0 else (served, failed + 1)
    return {"served": served, "failed": failed, "distinct_pids": len(pids)}


INVALID = b'{"method":"x"}\n'


def pipeline(path, total):
    counts = {}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(path)

    def send():
        batch = INVALID * 1000
        for start in range(0, total, 1000):
            sock.sendall(batch[:len(INVALID) * min(1000, total - start)])

    sender = threading.Thread(target=send)
    print("flooding", flush=True)
    sender.start()
    buffer = b""
    for _ in range(total):
        line, _, buffer = read_line(sock, buffer)
        reply = json.loads(line)
        key = "served" if reply["success"] else reply["error"]
        counts[key] = counts.get(key, 0) + 1
    sender.join()
    sock.close()
    return counts


def stall(path, count, lines):
    """Connections whose answers are never read: each waits in the daemon's write."""
    poller, socks = select.poll(), {}
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(path)
        sock.setblocking(False)
        data = REQUEST * lines
        while data:     # the daemon stops reading once its answers back up: send what it takes
            try:
                data = data[sock.send(data):]
            except BlockingIOError:
                break
        socks[sock.fileno()] = sock
        poller.register(sock, select.POLLHUP)       # never POLLIN: nothing here reads
    print("stalled", flush=True)
    closed = 0
    while socks:
        for fd, _ in poller.poll(60_000) or [(None, None)]:
            if fd is None:
                raise TimeoutError(f"{len(socks)} connections still open after 60 s")
            poller.unregister(fd)
            socks.pop(fd).close()
            closed += 1
    return {"closed": closed}


def main(argv):
    mode, path, first, second = argv[1], argv[2], int(argv[3]), int(argv[4])
    if mode == "pids":
        result = many_pids(path, first, second)
    elif mode == "pipeline":
        result = pipeline(path, first)
    elif mode == "stall":
        result = stall(path, first, second)
    else:
        result = flood(path, first, second, keep_alive=mode == "flood")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
