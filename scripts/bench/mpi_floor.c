/* The MPI floor: start-up and shutdown of an MPI job and nothing else, the cost every
 * MPI-based launcher pays before its first task (scripts/bench/peers.sh). */
#include <mpi.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Finalize();
    return 0;
}
