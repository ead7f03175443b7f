"""Independent math shared by the tests: central finite differences."""
import numpy as np


def finite_difference(f, array, h=1e-6):
    """d f() / d array by central differences, perturbing ``array`` in place (restored)."""
    grad = np.zeros(array.shape)
    for index in np.ndindex(*array.shape):
        saved = array[index]
        array[index] = saved + h
        up = f()
        array[index] = saved - h
        down = f()
        array[index] = saved
        grad[index] = (up - down) / (2.0 * h)
    return grad
