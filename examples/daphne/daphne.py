"""DAPHNE's distributed shape: workers serve on their IP:PORT, the coordinator reads
DISTRIBUTED_WORKERS=host:port,... and farms out work. Here the work is summing a range."""
import json
import os
import socket
import sys

if sys.argv[1] == "worker":
    host, port = os.environ["DLAUNCH_ROLE_WORKER_HOSTS"].split(",")[int(os.environ["DLAUNCH_ROLE_INDEX"])].rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    while True:
        conn, _ = server.accept()
        with conn:
            data = conn.recv(64)
            if not data:
                continue  # dlaunch's wait_for probe: it connects and closes
            first, last = map(int, data.decode().split())
            conn.sendall(str(sum(range(first, last))).encode())
else:
    workers = os.environ["DISTRIBUTED_WORKERS"].split(",")
    n = 300
    chunk = n // len(workers)
    total = 0
    for i, worker in enumerate(workers):
        host, port = worker.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"{i * chunk} {(i + 1) * chunk}".encode())
            total += int(conn.recv(64).decode())
    print(json.dumps({"workers": workers, "sum": total, "expected": sum(range(n))}))
    sys.exit(0 if total == sum(range(n)) else 1)
