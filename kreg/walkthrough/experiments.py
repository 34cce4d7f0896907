"""The walkthrough's experiments: the lecture's problems and their fixes.

Each function returns an `Experiment`: arms that train the same baseline
network with one technique changed, compared on the same data, seeds and
budget. `quick=True` shrinks budgets for a smoke run.
"""

import keras

import kreg
from kreg.walkthrough.runner import Arm
from kreg.walkthrough.runner import Experiment


def mlp(dataset, seed, hidden=(256, 256), activation="relu",
        initializer="glorot_uniform", kernel_regularizer=None,
        input_noise=0.0, input_dropout=0.0, hidden_dropout=0.0,
        batch_norm=False):
    """The baseline network with optional kreg pieces switched on."""
    layers = [keras.Input((dataset.input_dim,))]
    if input_noise:
        layers.append(kreg.layers.GaussianNoise(input_noise, seed=seed))
    if input_dropout:
        layers.append(kreg.layers.Dropout(input_dropout, seed=seed))
    for width in hidden:
        layers.append(
            keras.layers.Dense(
                width, kernel_initializer=_initializer(initializer, seed),
                kernel_regularizer=kernel_regularizer,
                use_bias=not batch_norm,
            )
        )
        if batch_norm:
            layers.append(kreg.layers.BatchNormalization())
        layers.append(keras.layers.Activation(activation))
        if hidden_dropout:
            layers.append(kreg.layers.Dropout(hidden_dropout, seed=seed))
    layers.append(
        keras.layers.Dense(
            dataset.num_classes,
            kernel_initializer=_initializer(initializer, seed),
            kernel_regularizer=kernel_regularizer,
        )
    )
    return keras.Sequential(layers)


def _initializer(spec, seed):
    if isinstance(spec, str):
        return keras.initializers.get({"class_name": spec,
                                       "config": {"seed": seed}})
    return spec(seed)


def optimizers(dataset, quick=False):
    """Lecture problem "slow training": SGD vs Adam vs RMSprop."""
    def build(seed, data):
        return mlp(data, seed)

    arms = [
        Arm("SGD (lr 0.01)", build,
            optimizer=lambda: keras.optimizers.SGD(0.01)),
        Arm("SGD + momentum 0.9 (lr 0.01)", build,
            optimizer=lambda: keras.optimizers.SGD(0.01, momentum=0.9)),
        Arm("RMSprop (lr 0.001)", build,
            optimizer=lambda: keras.optimizers.RMSprop(1e-3)),
        Arm("Adam (lr 0.001)", build,
            optimizer=lambda: keras.optimizers.Adam(1e-3)),
    ]
    return Experiment(
        key="optimizers",
        title="Slow training: SGD vs momentum vs RMSprop vs Adam",
        question=(
            "Same network, data and seeds; only the optimizer changes. The "
            "lecture: adaptive optimizers such as Adam and RMSprop converge "
            "faster than plain stochastic gradient descent."
        ),
        dataset=dataset,
        arms=arms,
        epochs=4 if quick else 15,
    )


def epochs_to_reach(experiment, threshold):
    """Mean first epoch (1-based) at which test accuracy >= threshold."""
    notes = []
    for arm in experiment.arms:
        reached = []
        for run in experiment.results:
            if run.arm != arm.name:
                continue
            hits = [
                i + 1 for i, a in enumerate(run.curves["test_accuracy"])
                if a >= threshold
            ]
            reached.append(hits[0] if hits else None)
        if reached and all(r is not None for r in reached):
            notes.append(
                f"{arm.name}: {sum(reached) / len(reached):.1f} epochs to "
                f"{threshold:.0%} test accuracy"
            )
        elif reached:
            got = sum(r is not None for r in reached)
            notes.append(
                f"{arm.name}: reached {threshold:.0%} test accuracy in "
                f"{got} of {len(reached)} runs"
            )
    return notes
