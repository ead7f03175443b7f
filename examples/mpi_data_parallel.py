"""Data-parallel training of a batch-norm layer over MPI, checked against one process.

Run it with any number of processes (or none: plain ``python`` is one process)::

    mpiexec -n 2 python examples/mpi_data_parallel.py

Every step, each process takes its own part of the global mini-batch (the parts differ in size
when the batch does not divide evenly), runs the synchronized forward and backward of
:mod:`cbn.mpi`, and updates the layer's parameters (γ, β by SGD) and moving statistics
(Keras-style: ``moving = momentum·moving + (1 − momentum)·batch``, biased batch variance).
Because the synchronized statistics and the parameter gradients are those of the whole batch,
and identical on every rank, every process ends with exactly the same weights, and they equal
those of ONE process training on the full batches with the core API — which the script checks.

Note on gradients: ``cbn.mpi.batch_norm_backward`` returns ``dgamma``/``dbeta`` already summed
over all ranks; do not all-reduce them again. The loss here is the mean over the GLOBAL batch,
so each rank scales its ``dy`` by the global element count.
"""
import numpy as np
from mpi4py import MPI

import cbn
import cbn.mpi

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


class Layer:
    """The trainable state of a batch-norm layer: what `cbn.BatchNormalization` holds."""

    def __init__(self):
        self.gamma = np.ones(N_FEATURES)
        self.beta = np.zeros(N_FEATURES)
        self.moving_mean = np.zeros(N_FEATURES)
        self.moving_var = np.ones(N_FEATURES)

    def update(self, mean, var, dgamma, dbeta):
        self.moving_mean = MOMENTUM * self.moving_mean + (1 - MOMENTUM) * mean
        self.moving_var = MOMENTUM * self.moving_var + (1 - MOMENTUM) * var
        self.gamma = self.gamma - LEARNING_RATE * dgamma
        self.beta = self.beta - LEARNING_RATE * dbeta

    def weights(self):
        return np.concatenate([self.gamma, self.beta, self.moving_mean, self.moving_var])


def train_step_synchronized(layer, x_local, target_local, comm):
    """One SGD step on this rank's part of the batch (collective over comm)."""
    y, mean, var = cbn.mpi.batch_norm_forward(x_local, layer.gamma, layer.beta,
                                              epsilon=EPSILON, comm=comm)
    # loss = mean over the GLOBAL batch of ½(y − target)²
    dy = (y.astype(np.float64) - target_local) / (N_GLOBAL * N_FEATURES)
    _, dgamma, dbeta = cbn.mpi.batch_norm_backward(dy, x_local, mean, var, layer.gamma,
                                                   epsilon=EPSILON, comm=comm)
    layer.update(mean, var, dgamma, dbeta)


def train_step_one_process(layer, x, target):
    """The same step with the core API on the whole batch."""
    y, mean, var = cbn.batch_norm_forward(x, layer.gamma, layer.beta, epsilon=EPSILON)
    dy = (y.astype(np.float64) - target) / (N_GLOBAL * N_FEATURES)
    _, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, layer.gamma, epsilon=EPSILON)
    layer.update(mean, var, dgamma, dbeta)


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    parallel, single = Layer(), Layer()
    for x, target in make_batches():
        mine = np.array_split(np.arange(N_GLOBAL), size)[rank]   # unequal parts
        train_step_synchronized(parallel, x[mine], target[mine], comm)
        train_step_one_process(single, x, target)                 # the check, on every rank

    weights = parallel.weights()
    everyone = comm.allgather(weights.tobytes())
    assert all(w == everyone[0] for w in everyone), "ranks ended with different weights"
    difference = np.max(np.abs(weights - single.weights()))
    np.testing.assert_allclose(weights, single.weights(), rtol=1e-9, atol=1e-9)
    if rank == 0:
        print(f"gamma = {np.round(parallel.gamma, 4)}")
        print(f"beta  = {np.round(parallel.beta, 4)}")
        print(f"{size} process(es), {N_STEPS} steps: bitwise identical weights on every rank, "
              f"and the same weights as 1 process on the full batch "
              f"(max |difference| = {difference:.2e})")


if __name__ == "__main__":
    main()
