/*
 * scripts/slurm-cluster/mpi_hello.c - tiny MPI smoke test for the test cluster.
 *
 *   mpicc -O2 -o mpi_hello mpi_hello.c
 *   srun --mpi=pmix ./mpi_hello srun      # or: mpirun ./mpi_hello mpirun
 *
 * Every rank prints one line
 *   hello via=LABEL rank=R size=S host=H procid=.. cvd=.. step_gpus=.. allreduce=ok ring=ok
 * after real communication (an allreduce over all ranks and a ring send/receive, which
 * crosses "node" boundaries and so the TCP transport).  Exit status 1 if a check fails.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char *env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return (v && *v) ? v : dflt;
}

int main(int argc, char **argv)
{
    int rank, size;
    char host[256] = "?";
    const char *label = argc > 1 ? argv[1] : "mpi";

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host - 1);

    /* Sum of all ranks must be size*(size-1)/2. */
    int sum = -1;
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    int allreduce_ok = (sum == size * (size - 1) / 2);

    /* Ring: send my rank to the right neighbour, receive the left neighbour's. */
    int right = (rank + 1) % size, left = (rank + size - 1) % size, got = -1;
    MPI_Sendrecv(&rank, 1, MPI_INT, right, 0, &got, 1, MPI_INT, left, 0,
                 MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    int ring_ok = (got == left);

    printf("hello via=%s rank=%d size=%d host=%s procid=%s cvd=%s step_gpus=%s allreduce=%s ring=%s\n",
           label, rank, size, host, env_or("SLURM_PROCID", "-"),
           env_or("CUDA_VISIBLE_DEVICES", "-"), env_or("SLURM_STEP_GPUS", "-"),
           allreduce_ok ? "ok" : "FAIL", ring_ok ? "ok" : "FAIL");
    fflush(stdout);

    MPI_Finalize();
    return (allreduce_ok && ring_ok) ? 0 : 1;
}
