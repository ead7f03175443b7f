"""cbn.nn: the small NumPy training toolkit the book chapter's Keras example needs.

Import it explicitly (``import cbn.nn``); the core of cbn never imports it. Names follow
Keras::

    import cbn.nn as nn
    model = nn.Sequential([
        nn.Flatten(input_shape=[28, 28]),
        nn.BatchNormalization(),
        nn.Dense(300, activation="elu", kernel_initializer="he_normal"),
        nn.BatchNormalization(),
        nn.Dense(100, activation="elu", kernel_initializer="he_normal"),
        nn.BatchNormalization(),
        nn.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=nn.SGD(learning_rate=1e-2, momentum=0.9), metrics=["accuracy"])
    history = model.fit(x_train, y_train, epochs=10, validation_data=(x_val, y_val))
    inference_model = nn.fold_batch_norm(model)
"""
from ..layer import BatchNormalization
from .config import floatx, set_floatx, set_random_seed
from .folding import fold_batch_norm
from .layers import Activation, Dense, Flatten, Layer
from .losses import MeanSquaredError, SparseCategoricalCrossentropy
from .model import History, Sequential
from .optimizers import SGD, clip_gradients

sparse_categorical_crossentropy = SparseCategoricalCrossentropy()

__all__ = ["Activation", "BatchNormalization", "Dense", "Flatten", "History", "Layer",
           "MeanSquaredError", "SGD", "Sequential", "SparseCategoricalCrossentropy",
           "clip_gradients", "floatx", "fold_batch_norm", "set_floatx", "set_random_seed",
           "sparse_categorical_crossentropy"]
