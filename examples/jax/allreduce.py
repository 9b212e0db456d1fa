"""Multi-process JAX on CPUs, started by dlaunch: every process contributes its rank and
checks the all-reduced sum. jax.distributed reads no launcher variables here: it is given
dlaunch's DLAUNCH_COORDINATOR_ADDRESS, WORLD_SIZE and RANK, as a user would.
    mpirun -n 5 dlaunch examples/jax/jax.toml
"""
import json
import os

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=os.environ["DLAUNCH_COORDINATOR_ADDRESS"],
    num_processes=int(os.environ["WORLD_SIZE"]),
    process_id=int(os.environ["RANK"]),
)

import jax.numpy as jnp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

rank = jax.process_index()
values = multihost_utils.process_allgather(jnp.array([rank + 1.0]))
total = float(jnp.sum(values))
expected = jax.process_count() * (jax.process_count() + 1) / 2
print(json.dumps({"rank": rank, "processes": jax.process_count(), "sum": total, "expected": expected}))
assert total == expected, (total, expected)
jax.distributed.shutdown()
