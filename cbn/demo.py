"""``python -m cbn demo``: the book chapter's BN model trained with cbn, side by side.

Trains the chapter's classifier (Flatten → [BN] → Dense(300) → [BN] → Dense(100) → [BN] →
Dense(10, softmax)) on scikit-learn's handwritten digits (1,797 real 8×8 images shipped
inside the scikit-learn package, so nothing is downloaded), with BN after each hidden
layer, with BN before the activations, and without BN; then with the saturating sigmoid
at the default and at larger learning rates, with and without BN. Every configuration is
trained from the same data split and the same seeds. The table reports, over the seeds,
how many epochs it took to reach the target validation accuracy, the final and best
validation accuracy, and the time per epoch; a PNG shows the learning curves. Finally the
trained BN model is folded (``cbn.nn.fold_batch_norm``) and compared with the original.

Needs the ``demo`` extra (scikit-learn; matplotlib for the picture).
"""
import argparse
import os
import sys
import time

import numpy as np

__all__ = ["main", "CONFIGS", "load_data", "build_model", "train"]

# (label, panel, BN placement, activation, kernel initializer, learning rate)
CONFIGS = [
    ("elu, BN after each hidden layer", "elu, lr 0.01", "after", "elu", "he_normal", 0.01),
    ("elu, BN before activations", "elu, lr 0.01", "before", "elu", "he_normal", 0.01),
    ("elu, no BN", "elu, lr 0.01", "none", "elu", "he_normal", 0.01),
    ("sigmoid lr 0.01, BN after", "sigmoid, lr 0.01", "after", "sigmoid", "glorot_uniform",
     0.01),
    ("sigmoid lr 0.01, no BN", "sigmoid, lr 0.01", "none", "sigmoid", "glorot_uniform", 0.01),
    ("sigmoid lr 0.1, BN after", "sigmoid, lr 0.1", "after", "sigmoid", "glorot_uniform", 0.1),
    ("sigmoid lr 0.1, no BN", "sigmoid, lr 0.1", "none", "sigmoid", "glorot_uniform", 0.1),
    ("sigmoid lr 1.0, BN after", "sigmoid, lr 1.0", "after", "sigmoid", "glorot_uniform", 1.0),
    ("sigmoid lr 1.0, no BN", "sigmoid, lr 1.0", "none", "sigmoid", "glorot_uniform", 1.0),
]


def load_data(seed=0):
    """The digits, scaled to [0, 1] as the chapter scales MNIST, split 75/25 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def build_model(placement, activation="elu", kernel_initializer="he_normal",
                input_shape=(8, 8), hidden=(300, 100), n_classes=10):
    """The chapter's model; ``placement`` is "after", "before" or "none"."""
    import cbn.nn as nn
    layers = [nn.Flatten(input_shape=list(input_shape))]
    if placement != "none":
        layers.append(nn.BatchNormalization())
    for units in hidden:
        if placement == "before":
            layers += [nn.Dense(units, kernel_initializer=kernel_initializer, use_bias=False),
                       nn.BatchNormalization(), nn.Activation(activation)]
        else:
            layers.append(nn.Dense(units, activation=activation,
                                   kernel_initializer=kernel_initializer))
            if placement == "after":
                layers.append(nn.BatchNormalization())
    layers.append(nn.Dense(n_classes, activation="softmax"))
    return nn.Sequential(layers)


def train(config, data, epochs, seed, batch_size=32):
    """Train one configuration from one seed; returns its per-epoch history."""
    import cbn.nn as nn
    _, _, placement, activation, initializer, learning_rate = config
    x_train, x_val, y_train, y_val = data
    nn.set_random_seed(seed)
    model = build_model(placement, activation, initializer)
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=nn.SGD(learning_rate=learning_rate), metrics=["accuracy"])
    history = {"loss": [], "val_accuracy": [], "time": []}
    with np.errstate(all="ignore"):          # a diverging run overflows; it is reported
        for _ in range(epochs):
            logs = model.fit(x_train, y_train, batch_size=batch_size, epochs=1, verbose=0,
                             validation_data=(x_val, y_val)).history
            for key in history:
                history[key].append(logs[key][0])
            if not np.isfinite(logs["loss"][0]):
                break
    return model, history


def _epochs_to(history, target):
    reached = np.flatnonzero(np.asarray(history["val_accuracy"]) >= target)
    return int(reached[0]) + 1 if reached.size else None


def _summarise(histories, target):
    epochs = [_epochs_to(h, target) for h in histories]
    hit = [e for e in epochs if e is not None]
    diverged = sum(not np.isfinite(h["loss"][-1]) for h in histories)
    final = [h["val_accuracy"][-1] for h in histories]
    best = [max(h["val_accuracy"]) for h in histories]
    times = [t for h in histories for t in h["time"]]
    reach = (f"{int(np.median(hit))}" if hit else "never") + f" ({len(hit)}/{len(epochs)})"
    seconds_to = f"{np.median(hit) * np.min(times):.1f} s" if hit else "-"
    final_text = f"{np.mean(final):.3f} ± {np.std(final):.3f}"
    if diverged:
        final_text += f" ({diverged} diverged)"
    return (reach, final_text, f"{np.mean(best):.3f}", f"{1000 * np.min(times):.0f} ms",
            seconds_to)


def format_table(results, target, seeds, epochs):
    header = ("configuration", f"epochs to {100 * target:.0f}% val acc",
              "final val acc", "best val acc", "time/epoch (min)",
              "time to target")
    rows = [(label,) + _summarise(histories, target) for label, histories in results]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([
        f"{len(seeds)} seed(s) {list(seeds)}, {epochs} epochs, SGD (no momentum), batch 32. "
        "Epochs to target: median over the seeds that reached it (how many did); "
        "val acc: mean ± std over seeds.\ntime/epoch: the fastest epoch of all seeds (the "
        "least disturbed by other load), training plus the validation pass; time to target = "
        "median epochs x time/epoch.",
        line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows])


def plot(results, path):
    """Validation accuracy and training loss per epoch, one panel per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys(c[1] for c in CONFIGS if c[0] in dict(results)))
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 6.5), squeeze=False,
                             sharey="row")
    styles = {"after": ("-", "tab:blue"), "before": ("--", "tab:orange"),
              "none": (":", "tab:green")}
    for column, panel in enumerate(panels):
        for config in CONFIGS:
            label, config_panel, placement = config[:3]
            if config_panel != panel or label not in dict(results):
                continue
            histories = dict(results)[label]
            for row, key in enumerate(("val_accuracy", "loss")):
                length = min(len(h[key]) for h in histories)
                values = np.array([h[key][:length] for h in histories])
                epochs = np.arange(1, length + 1)
                name = {"after": "BN after", "before": "BN before", "none": "no BN"}[placement]
                style, color = styles[placement]
                axes[row, column].plot(epochs, values.mean(axis=0), style, color=color,
                                       label=name)
                axes[row, column].fill_between(epochs, values.min(axis=0), values.max(axis=0),
                                               color=color, alpha=0.15)
        axes[0, column].set_title(panel)
        axes[1, column].set_xlabel("epoch")
        axes[1, column].set_yscale("log")
        axes[0, column].legend(loc="lower right")
    axes[0, 0].set_ylabel("validation accuracy")
    axes[1, 0].set_ylabel("training loss")
    fig.suptitle("cbn.nn, the chapter's model on scikit-learn digits "
                 "(mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fold_check(model, x_val, repeats):
    import cbn.nn as nn
    folded = nn.fold_batch_norm(model)
    timings = []
    for candidate in (model, folded):
        best = np.inf
        for _ in range(repeats):          # the fastest repeat: least disturbed by other load
            start = time.perf_counter()
            probabilities = candidate.predict(x_val, batch_size=len(x_val))
            best = min(best, time.perf_counter() - start)
        timings.append(best)
    difference = np.abs(folded.predict(x_val) - model.predict(x_val)).max()
    return len(model.layers), len(folded.layers), difference, timings, probabilities


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cbn demo",
        description="Train the book chapter's batch-normalized model on scikit-learn's "
                    "digits with and without BN and compare.")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--target", type=float, default=0.95,
                        help="validation accuracy whose first epoch is reported")
    parser.add_argument("--out", default="cbn-demo",
                        help="directory for learning_curves.png (default ./cbn-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs, 1 seed: a smoke run of a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, 1
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")

    try:
        data = load_data()
    except ImportError:
        print("The demo needs scikit-learn for its data set: pip install scikit-learn matplotlib",
              file=sys.stderr)
        return 1
    x_train, x_val, _, _ = data
    print(f"scikit-learn digits: {len(x_train)} training and {len(x_val)} validation images "
          "of 8x8 pixels, 10 classes")
    build_model("after").summary()

    seeds = list(range(args.seeds))
    results, trained = [], None
    for config in CONFIGS:
        histories = []
        for seed in seeds:
            model, history = train(config, data, args.epochs, seed)
            histories.append(history)
            if trained is None:
                trained = model               # the chapter's model, for the folding check
        results.append((config[0], histories))
        print(f"  trained {config[0]}", flush=True)

    print()
    print(format_table(results, args.target, seeds, args.epochs))

    n_layers, n_folded, difference, (t_model, t_folded), _ = _fold_check(
        trained, x_val, repeats=3 if args.quick else 20)
    print(f"\nFolding the trained '{CONFIGS[0][0]}' model: {n_layers} layers -> {n_folded}, "
          f"max |difference| of predicted probabilities {difference:.1e}, predict on "
          f"{len(x_val)} images {1000 * t_model:.2f} ms -> {1000 * t_folded:.2f} ms")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "learning_curves.png")
    try:
        plot(results, path)
    except ImportError:
        print("\nmatplotlib is not installed: no learning-curve picture "
              "(pip install scikit-learn matplotlib)")
    else:
        print(f"\nLearning curves written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
