/* Raw MPI_Bcast throughput, the yardstick for dataset staging: SIZE bytes from rank 0 to all
 * ranks in messages of CHUNK bytes, from memory to memory (one buffer, reused; no disk, no
 * checksum). Prints GB/s (1e9 bytes per second) on rank 0, timed from a barrier to a barrier.
 *
 *   mpirun -n 4 raw_bcast SIZE CHUNK
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (argc != 3) {
        if (rank == 0) fprintf(stderr, "usage: raw_bcast SIZE CHUNK\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    long long size = atoll(argv[1]), chunk = atoll(argv[2]);
    if (chunk <= 0 || chunk > (1LL << 30) || size < 0) MPI_Abort(MPI_COMM_WORLD, 2);
    char *buf = malloc((size_t)chunk);
    if (!buf) MPI_Abort(MPI_COMM_WORLD, 1);
    memset(buf, rank, (size_t)chunk);
    MPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime();
    for (long long sent = 0; sent < size; sent += chunk) {
        int n = (int)(size - sent < chunk ? size - sent : chunk);
        MPI_Bcast(buf, n, MPI_BYTE, 0, MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    double seconds = MPI_Wtime() - start;
    if (rank == 0) printf("%.3f\n", (double)size / seconds / 1e9);
    free(buf);
    MPI_Finalize();
    return 0;
}
