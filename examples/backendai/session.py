"""A Backend.AI cluster-session program: the subs answer with who they are, the main asks
every sub and checks the answers against BACKENDAI_CLUSTER_* as it sees them."""
import contextlib
import json
import os
import socket

role = os.environ["BACKENDAI_CLUSTER_ROLE"]
idx = int(os.environ["BACKENDAI_CLUSTER_IDX"])
me = {k: v for k, v in os.environ.items() if k.startswith("BACKENDAI_CLUSTER_")}
# Backend.AI's host list has no ports; dlaunch's role list pairs each address with one.
subs = os.environ["DLAUNCH_ROLE_SUB_HOSTS"].split(",")

if role == "sub":
    host, port = subs[idx - 1].rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    while True:
        conn, _ = server.accept()
        # `dlaunch wait-for` only connects and closes: that peer is gone before the answer.
        with conn, contextlib.suppress(OSError):
            conn.sendall(json.dumps(me).encode())
else:
    answers = []
    for sub in subs:
        host, port = sub.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            answers.append(json.loads(conn.recv(65536).decode()))
    assert [a["BACKENDAI_CLUSTER_IDX"] for a in answers] == ["1", "2", "3"], answers
    assert all(a["BACKENDAI_CLUSTER_ROLE"] == "sub" for a in answers), answers
    assert all(a["BACKENDAI_CLUSTER_REPLICAS"] == me["BACKENDAI_CLUSTER_REPLICAS"] for a in answers)
    print(json.dumps({"main": me, "subs": answers}))
