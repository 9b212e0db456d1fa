"""The shape of OpenPAI's TensorFlow parameter-server example, with plain sockets.

A `ps` holds one shard of the parameters: it listens on its container port and adds every
update a worker sends to its shard, answering with the new value. A `worker` sends each
parameter server a few updates and checks the answers. Everything is found through OpenPAI's
variables (PAI_TASK_ROLE_ps_HOST_LIST, PAI_CURRENT_TASK_ROLE_NAME, ...).
"""
import json
import os
import socket

role = os.environ["PAI_CURRENT_TASK_ROLE_NAME"]
index = int(os.environ["PAI_CURRENT_TASK_ROLE_CURRENT_TASK_INDEX"])
ps_hosts = os.environ["PAI_TASK_ROLE_ps_HOST_LIST"].split(",")
workers = int(os.environ["PAI_TASK_ROLE_TASK_COUNT_worker"])
STEPS = 3


def serve():
    host, port = ps_hosts[index].rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    shard = 0
    while True:
        conn, _ = server.accept()
        with conn:
            data = conn.recv(64)
            if not data:
                continue  # dlaunch's wait_for probe: it connects and closes
            shard += int(data.decode())
            conn.sendall(str(shard).encode())


def train():
    seen = []
    for step in range(STEPS):
        for ps in ps_hosts:
            host, port = ps.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=30) as conn:
                conn.sendall(str(index + 1).encode())
                seen.append(int(conn.recv(64).decode()))
    # Each answer is a running total of updates from all workers: it only grows.
    assert all(a > 0 for a in seen), seen
    print(json.dumps({
        "role": role,
        "index": index,
        "ps": ps_hosts,
        "workers": workers,
        "answers": seen,
        "http_port": os.environ.get("PAI_CONTAINER_HOST_http_PORT_LIST"),
        "tf_config": json.loads(os.environ["TF_CONFIG"]),
    }))


if role == "ps":
    print(json.dumps({"role": role, "index": index, "http_port": os.environ["PAI_CONTAINER_HOST_http_PORT_LIST"]}), flush=True)
    serve()
else:
    train()
