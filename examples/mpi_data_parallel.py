"""Data-parallel training of a batch-norm layer over MPI, checked against one process.

Run it with any number of processes (or none: plain ``python`` is one process)::

    mpiexec -n 2 python -m mpi4py examples/mpi_data_parallel.py

Every step, each process takes its own part of the global mini-batch (the parts differ in size
when the batch does not divide evenly) and runs ``cbn.BatchNormalization(synchronized=True)``
on it: the training-mode call normalizes with the statistics of the WHOLE batch (gathered by
:mod:`cbn.mpi`) and updates the moving statistics from them (Keras-style:
``moving = momentum·moving + (1 − momentum)·batch``, biased batch variance); ``backward``
gives this process's part of dx and the parameter gradients of the whole batch; then γ, β take
an SGD step. Because the synchronized statistics and the gradients are those of the whole
batch, and bitwise identical on every rank, every process ends with exactly the same weights,
and they equal those of ONE process training an ordinary ``cbn.BatchNormalization`` on the
full batches — which the script checks.

Note on gradients: the synchronized layer's ``gradients`` are already summed over all ranks;
do not all-reduce them again. The loss here is the mean over the GLOBAL batch, so each rank
scales its ``dy`` by the global element count.
"""
import numpy as np
from mpi4py import MPI

import cbn

N_GLOBAL, N_FEATURES, N_STEPS = 50, 6, 20
LEARNING_RATE, MOMENTUM, EPSILON = 0.5, 0.9, 1e-3


def make_batches(seed=0):
    """The same data set on every rank: batches with large offsets and a target to fit."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-100, 100, N_FEATURES)
    for _ in range(N_STEPS):
        x = (offset + rng.uniform(0.5, 3.0, N_FEATURES) * rng.standard_normal(
            (N_GLOBAL, N_FEATURES))).astype(np.float32)
        target = 0.7 * rng.standard_normal((N_GLOBAL, N_FEATURES)) + 0.3
        yield x, target.astype(np.float32)


def make_layer(**kwargs):
    return cbn.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs)


def train_step(layer, x, target):
    """One SGD step on x, this process's part of the batch (collective if synchronized)."""
    y = layer(x, training=True)
    # loss = mean over the GLOBAL batch of ½(y − target)²
    layer.backward((y.astype(np.float64) - target) / (N_GLOBAL * N_FEATURES))
    for weight, gradient in zip(layer.trainable_weights, layer.gradients):
        weight -= LEARNING_RATE * gradient


def weights(layer):
    return np.concatenate(layer.get_weights())   # gamma, beta, moving mean, moving variance


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    parallel = make_layer(synchronized=True, comm=comm)
    single = make_layer()                                         # the check, on every rank
    for x, target in make_batches():
        mine = np.array_split(np.arange(N_GLOBAL), size)[rank]   # unequal parts
        train_step(parallel, x[mine], target[mine])
        train_step(single, x, target)

    ours, reference = weights(parallel), weights(single)
    everyone = comm.allgather(ours.tobytes())
    assert all(w == everyone[0] for w in everyone), "ranks ended with different weights"
    difference = np.max(np.abs(ours - reference))
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-9)
    if rank == 0:
        print(f"gamma = {np.round(parallel.gamma, 4)}")
        print(f"beta  = {np.round(parallel.beta, 4)}")
        print(f"{size} process(es), {N_STEPS} steps: bitwise identical weights on every rank, "
              f"and the same weights as 1 process on the full batch "
              f"(max |difference| = {difference:.2e})")


if __name__ == "__main__":
    main()
