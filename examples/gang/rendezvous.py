"""A framework-free distributed rendezvous, as torch.distributed's TCP store does it.

Process 0 listens on MASTER_ADDR:MASTER_PORT; every other process connects, sends its RANK,
and receives the sum of all ranks. Each process prints one JSON line with what it saw, so
dlaunch's environment contract can be checked from the outside.
    dlaunch examples/gang/gang.toml
"""
import json
import os
import socket
import time

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
addr = os.environ["MASTER_ADDR"]
port = int(os.environ["MASTER_PORT"])

if rank == 0:
    server = socket.create_server((addr, port))
    server.listen(world)
    peers = [server.accept()[0] for _ in range(world - 1)]
    total = sum(int(peer.recv(32).decode()) for peer in peers)
    for peer in peers:
        peer.sendall(str(total).encode())
        peer.close()
else:
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    conn.sendall(str(rank).encode())
    total = int(conn.recv(32).decode())

print(json.dumps({
    "rank": rank,
    "world": world,
    "sum_of_ranks": total,
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "local_world": int(os.environ["LOCAL_WORLD_SIZE"]),
    "node_rank": int(os.environ["NODE_RANK"]),
    "host": os.environ["DLAUNCH_HOST"],
    "master": f"{addr}:{port}",
    "tf_config": json.loads(os.environ["TF_CONFIG"]),
}))
