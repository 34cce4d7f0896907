"""The walkthrough's experiments: the lecture's problems and their fixes.

Each function returns an `Experiment` (`transfer_mnist` a list of two):
arms that train the same baseline network with one technique changed,
compared on the same data, seeds and budget. `quick=True` shrinks budgets
for a smoke run.
"""

import keras
import numpy as np

import kreg
from kreg.walkthrough import data as data_module
from kreg.walkthrough.runner import Arm
from kreg.walkthrough.runner import Experiment
from kreg.walkthrough.runner import default_loss
from kreg.walkthrough.runner import default_optimizer


def mlp(dataset, seed, hidden=(256, 256), activation="relu",
        initializer="glorot_uniform", kernel_regularizer=None,
        input_noise=0.0, input_dropout=0.0, hidden_dropout=0.0,
        batch_norm=False, kernel_constraint=None):
    """The baseline network with optional kreg pieces switched on.

    `kernel_constraint`: a zero-argument factory of a Keras constraint put
    on every kernel (e.g. max-norm), or None.
    """
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
                kernel_constraint=(kernel_constraint()
                                   if kernel_constraint else None),
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
            kernel_constraint=(kernel_constraint()
                               if kernel_constraint else None),
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


def overfitting(dataset, quick=False):
    """Lecture problem "overfitting": each regularizer against the baseline.

    A wide network on a small training subset overfits; every arm changes
    one thing (or, in the last arm, all of them together).
    """
    train_size = 300 if quick else 400
    data = dataset.subset(train_size, seed=0)
    width = (512, 512)

    def plain(seed, d):
        return mlp(d, seed, hidden=width)

    def l2(seed, d):
        return mlp(d, seed, hidden=width,
                   kernel_regularizer=kreg.regularizers.L2(1e-3))

    def dropout(seed, d):
        return mlp(d, seed, hidden=width, input_dropout=0.2,
                   hidden_dropout=0.5)

    def noise(seed, d):
        return mlp(d, seed, hidden=width, input_noise=0.5)

    def everything(seed, d):
        return mlp(d, seed, hidden=width, input_noise=0.5,
                   input_dropout=0.2, hidden_dropout=0.5,
                   kernel_regularizer=kreg.regularizers.L2(1e-3))

    def smoothed():
        return kreg.losses.LabelSmoothingCrossentropy(0.1, from_logits=True)

    def ema(seed, d):
        return [kreg.callbacks.EMA(decay=0.99)]

    arms = [
        Arm("baseline", plain),
        Arm("L2 1e-3 (kreg, lecture form)", l2),
        Arm("dropout 0.2 in / 0.5 hidden", dropout),
        Arm("Gaussian noise 0.5 on inputs", noise),
        Arm("label smoothing 0.1", plain, loss=smoothed),
        Arm("EMA of weights (decay 0.99)", plain, callbacks=ema),
        Arm("all of the above", everything, loss=smoothed, callbacks=ema),
    ]
    return Experiment(
        key="overfitting",
        title="Overfitting: regularizers against the same baseline",
        question=(
            f"A 512-512 ReLU network trained on {train_size} examples "
            "overfits. Each arm adds one regularizer of the lecture (weight "
            "decay, dropout, noise, label smoothing, weight averaging); the "
            "last arm combines them."
        ),
        dataset=data,
        arms=arms,
        epochs=12 if quick else 60,
    )


def _validation_split(dataset, fraction=0.2, seed=0):
    index = np.random.RandomState(seed).permutation(len(dataset.x_train))
    cut = int(round(len(index) * (1 - fraction)))
    train, val = index[:cut], index[cut:]
    return ((dataset.x_train[train], dataset.y_train[train]),
            (dataset.x_train[val], dataset.y_train[val]))


def early_stopping(dataset, quick=False):
    """Lecture: early stopping, then train again on train + validation data."""
    train_size = 300 if quick else 400
    data = dataset.subset(train_size, seed=0)
    patience = 3 if quick else 8
    batch_size = 32

    def build(seed, d):
        return mlp(d, seed, hidden=(512, 512))

    def stopper():
        return kreg.callbacks.EarlyStopping(
            patience=patience, restore_best_weights=True
        )

    def fit_with(retrain_algorithm):
        def fit(model, d, epochs, batch, callbacks):
            (x, y), (x_val, y_val) = _validation_split(d)
            extra = [stopper()]
            if retrain_algorithm is not None:
                # The test curves go on through phase 2 (the recorders
                # among `callbacks`).
                extra.append(kreg.callbacks.RetrainOnFullData(
                    d.x_train, d.y_train, algorithm=retrain_algorithm,
                    batch_size=batch, validation_data=(x_val, y_val),
                    max_epochs=epochs, callbacks=list(callbacks),
                ))
            return model.fit(
                x, y, epochs=epochs, batch_size=batch,
                validation_data=(x_val, y_val),
                callbacks=callbacks + extra, verbose=0,
            )
        return fit

    arms = [
        Arm("early stopping on 80 % (restore best)", build,
            fit=fit_with(None)),
        Arm("+ retrain on 100 % from scratch (7.2)", build,
            fit=fit_with("restart")),
        Arm("+ continue on 100 % (7.3)", build, fit=fit_with("continue")),
    ]
    return Experiment(
        key="early_stopping",
        title="Early stopping, then retraining on all the data",
        question=(
            "Early stopping holds out 20 % of the training data to find the "
            "best epoch. The lecture's procedure then trains again on all of "
            "it: from scratch for the best number of epochs (Goodfellow et "
            "al. algorithm 7.2), or on from the stopped weights until the "
            "validation loss falls below the best training loss (7.3)."
        ),
        dataset=data,
        arms=arms,
        epochs=15 if quick else 100,
        batch_size=batch_size,
    )


def _monitor(seed, dataset):
    return [kreg.callbacks.GradientMonitor(frequency=10, warn=False)]


def _first_epoch_layer_norms(callbacks):
    """Mean per-layer gradient norm over the first epoch's samples."""
    for callback in callbacks:
        if isinstance(callback, kreg.callbacks.GradientMonitor):
            samples = [norms for epoch, _, norms in callback.history
                       if epoch == 0]
            if not samples:
                return {}
            # Only kernels' layers (Dense), in network order.
            layers = [name for name in samples[0] if "dense" in name]
            return {
                "layer_norms": [
                    sum(s[name] for s in samples) / len(samples)
                    for name in layers
                ]
            }
    return {}


def gradients(dataset, quick=False):
    """Lecture problem "vanishing/exploding gradients" and its fixes.

    A deep (8 hidden layers) network: with sigmoid units and weights drawn
    too small the gradient shrinks layer by layer (made visible by
    `kreg.callbacks.GradientMonitor`); batch normalization or the lecture's
    initialization (ReLU, weights scaled by 1/sqrt(n_in)) fix it. With
    weights drawn too large the gradient explodes; `ClippedOptimizer` with a
    global-norm threshold tames it.
    """
    depth = (64,) * 8

    def small(seed):
        return keras.initializers.RandomNormal(stddev=0.01, seed=seed)

    def lecture(seed):  # variance 1/n_in
        return keras.initializers.VarianceScaling(
            1.0, "fan_in", "normal", seed=seed
        )

    def large(seed):  # variance 9/n_in: each ReLU layer doubles the signal
        return keras.initializers.VarianceScaling(
            9.0, "fan_in", "normal", seed=seed
        )

    def deep(activation, initializer, batch_norm=False):
        def build(seed, d):
            return mlp(d, seed, hidden=depth, activation=activation,
                       initializer=initializer, batch_norm=batch_norm)
        return build

    def sgd():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    def clipped():
        return kreg.optimizers.ClippedOptimizer(sgd(), global_clipnorm=1.0)

    arms = [
        Arm("sigmoid, N(0, 0.01^2) init", deep("sigmoid", small),
            optimizer=sgd, callbacks=_monitor,
            collect=_first_epoch_layer_norms),
        Arm("sigmoid, N(0, 0.01^2) + BatchNormalization",
            deep("sigmoid", small, batch_norm=True), optimizer=sgd,
            callbacks=_monitor, collect=_first_epoch_layer_norms),
        Arm("ReLU, 1/sqrt(n_in) init (lecture)", deep("relu", lecture),
            optimizer=sgd, callbacks=_monitor,
            collect=_first_epoch_layer_norms),
        Arm("ReLU, 3/sqrt(n_in) init, plain SGD", deep("relu", large),
            optimizer=sgd),
        Arm("ReLU, 3/sqrt(n_in) init + ClippedOptimizer(global 1.0)",
            deep("relu", large), optimizer=clipped, callbacks=_monitor,
            collect=_first_epoch_layer_norms),
    ]
    return Experiment(
        key="gradients",
        title="Vanishing and exploding gradients in a deep network",
        question=(
            "Eight hidden layers of 64 units, SGD with momentum (lr 0.01), "
            "same data and seeds. Per-layer gradient norms come from "
            "GradientMonitor (first epoch, mean over samples)."
        ),
        dataset=dataset,
        arms=arms,
        epochs=3 if quick else 20,
    )


def layer_norm_notes(experiment):
    """One line per measured arm: first vs last layer gradient norm."""
    notes = []
    for arm in experiment.arms:
        norms = [r.extras["layer_norms"] for r in experiment.results
                 if r.arm == arm.name and r.extras.get("layer_norms")]
        if not norms:
            continue
        first = sum(n[0] for n in norms) / len(norms)
        last = sum(n[-1] for n in norms) / len(norms)
        notes.append(
            f"{arm.name}: gradient norm of the first layer {first:.2e}, "
            f"of the output layer {last:.2e} (ratio {first / last:.1e})"
        )
    return notes


def bagging(dataset, quick=False):
    """Lecture: "Bagging & Dropout". One network, dropout, MC dropout at
    test time, and ensembles of 5 (bootstrap samples, or all the data)."""
    train_size = 300 if quick else 400
    data = dataset.subset(train_size, seed=0)
    width = (256, 256)
    members = 5

    def plain(seed, d):
        return mlp(d, seed, hidden=width)

    def dropout(seed, d):
        return mlp(d, seed, hidden=width, input_dropout=0.2,
                   hidden_dropout=0.5)

    def mc_dropout(seed, d):
        model = dropout(seed, d)
        for layer in model.layers:
            if isinstance(layer, kreg.layers.Dropout):
                layer.mc = True
        return model

    def mc_predict(model, x):
        mean, _ = kreg.models.predict_with_uncertainty(
            model, x, num_samples=20, from_logits=True)
        return np.log(np.maximum(mean, 1e-12))

    def ensemble(mode):
        def build(seed, d):
            # Each member its own initialization (seed, seed + 1000, ...).
            made = iter(range(seed, seed + 1000 * members, 1000))
            return kreg.models.Ensemble(
                lambda: mlp(d, next(made), hidden=width),
                num_members=members, mode=mode, combine="softmax", seed=seed)
        return build

    arms = [
        Arm("one network", plain),
        Arm("dropout 0.2 in / 0.5 hidden", dropout),
        Arm("same + MC dropout at test time (20 passes)", mc_dropout,
            predict=mc_predict),
        Arm(f"bagging, {members} members (bootstrap)", ensemble("bootstrap")),
        Arm(f"ensemble of {members} on all the data", ensemble("full")),
    ]
    return Experiment(
        key="bagging",
        title="Bagging and dropout",
        question=(
            f"A 256-256 ReLU network on {train_size} examples, the same "
            "epochs for every arm (an ensemble trains its 5 members in one "
            "fit: 5 times the compute). The lecture: bagging averages k "
            "models trained on bootstrap samples; dropout is a cheap "
            "approximation of it, by parameter sharing between sub-networks."
            " Scored on accuracy, cross-entropy (NLL) and expected "
            "calibration error (15 bins)."
        ),
        dataset=data,
        arms=arms,
        epochs=8 if quick else 40,
    )


class NotApplicable(ValueError):
    """An experiment that does not apply to the data set (e.g. too few
    classes); the walkthrough skips it with the reason."""


LABEL_METHODS = (
    "from scratch",
    "transfer, head only",
    "transfer, head then unfreeze (FineTuning)",
    "unsupervised pretraining (pretrain_layerwise), then supervised",
)


def labels(dataset, quick=False, fractions=None, epochs=None,
           source_epochs=None, pretrain_epochs=None):
    """Lecture: too little labelled data. Transfer learning and
    unsupervised pretraining against training from scratch, for several
    fractions of labelled images.

    The target task is the upper half of the classes (on digits and MNIST
    5-9, relabelled 0-4; scored on the test split's classes 5-9), trained
    on a stratified `fraction` of its training images drawn with the run's
    seed. Transfer arms start from a network trained on the lower half
    (0-4) of the training split, trained inside the arm (its time is in
    the arm's); the pretraining arm runs `kreg.models.pretrain_layerwise`
    on every training input, without labels. Every arm gets the same
    supervised epochs. `quick` runs two fractions (1 and 20 %) on small budgets.
    """
    fractions = fractions or ((0.01, 0.2) if quick else (0.01, 0.05, 0.2))
    epochs = epochs or (6 if quick else 100)
    source_epochs = source_epochs or (2 if quick else 20)
    pretrain_epochs = pretrain_epochs or (1 if quick else 10)
    width = (256, 256)
    if dataset.num_classes < 4:
        raise NotApplicable(
            f"it splits the classes in two halves of at least 2; "
            f"{dataset.name} has {dataset.num_classes}")
    half = dataset.num_classes // 2
    source = data_module.class_split(dataset, range(half))
    target = data_module.class_split(dataset, range(half,
                                                    dataset.num_classes))
    source_names = f"0-{half - 1}"
    target_names = f"{half}-{dataset.num_classes - 1}"
    unlabelled = dataset.x_train
    freeze_epochs, epochs_per_step = _fine_tuning_stages(epochs)

    def scratch(seed, d):
        return mlp(d, seed, hidden=width)

    def transfer(frozen):
        def build(seed, d):
            trained = mlp(source, seed, hidden=width)
            trained.compile(optimizer=default_optimizer(),
                            loss=default_loss())
            trained.fit(source.x_train, source.y_train,
                        epochs=source_epochs, batch_size=32, verbose=0)
            return _new_head(trained, d.num_classes, seed, frozen)
        return build

    def pretrained(seed, d):
        model = mlp(d, seed, hidden=width)
        kreg.models.pretrain_layerwise(
            model, unlabelled, epochs=pretrain_epochs, corruption=0.3,
            seed=seed, verbose=0)
        return model

    arms = _label_arms(fractions, target, epochs, scratch, transfer,
                       pretrained)
    return Experiment(
        key="labels",
        title="Too little labelled data: transfer learning and pretraining",
        question=(
            f"Target task: classes {target_names}, trained on "
            f"{', '.join(f'{f * 100:g} %' for f in fractions)} of their "
            "training images with labels (stratified, at least one per "
            "class, drawn with the seed), scored on all test images of "
            f"classes {target_names}. A 256-256 ReLU network with "
            f"{target.num_classes} outputs and the same "
            f"{epochs} supervised epochs in every arm. From scratch; "
            f"transfer from the same network trained on classes "
            f"{source_names} "
            f"({source_epochs} epochs, inside the arm) with only a new head "
            f"trained, or with FineTuning (head alone for {freeze_epochs} "
            "epochs, then the base unfrozen from the top in 2 steps of "
            f"{epochs_per_step} epochs, learning rate 0.1 x the head's); "
            "or greedy layer-wise denoising-autoencoder pretraining "
            f"({pretrain_epochs} epochs per layer, masking 0.3) on all "
            f"{len(unlabelled)} training inputs without labels, then "
            "supervised training. The lecture: pretraining helps most "
            "when labels are few."
        ),
        dataset=target,
        arms=arms,
        epochs=epochs,
    )


def _fine_tuning_stages(epochs):
    """The FineTuning schedule of the label experiments: the head alone for
    half the epochs, then the base unfrozen from the top in 2 steps of a
    quarter of the epochs (learning rate 0.1 x the head's)."""
    return epochs // 2, max(1, epochs // 4)


def _new_head(trained, num_classes, seed, frozen):
    """`trained`'s layers but its output layer, as a model named "base"
    (frozen or not), under a new output layer."""
    shape = tuple(trained.inputs[0].shape[1:])
    base = keras.Sequential([keras.Input(shape), *trained.layers[:-1]],
                            name="base")
    base.trainable = not frozen
    # Not `seed`: that draw is the source network's first output layer,
    # which the trained features are fitted against.
    head = keras.layers.Dense(
        num_classes, kernel_initializer=_initializer("glorot_uniform",
                                                     seed + 1))
    return keras.Sequential([keras.Input(shape), base, head])


def _label_arms(fractions, target, epochs, scratch, transfer, pretrained,
                rows=None):
    """The four methods of LABEL_METHODS at every label fraction of
    `target` (a stratified subset drawn with the seed, cycled to `rows`
    rows per epoch when given). `scratch` and `pretrained` are model
    builders, `transfer(frozen)` returns one."""
    freeze_epochs, epochs_per_step = _fine_tuning_stages(epochs)

    def schedule(seed, d):
        return [kreg.callbacks.FineTuning(
            "base", freeze_epochs=freeze_epochs, unfreeze_steps=2,
            epochs_per_step=epochs_per_step, base_learning_rate_factor=0.1)]

    methods = dict(zip(LABEL_METHODS, (
        {"build": scratch},
        {"build": transfer(frozen=True)},
        {"build": transfer(frozen=False), "callbacks": schedule},
        {"build": pretrained},
    )))
    arms = []
    for fraction in fractions:
        images = len(data_module.labelled_indices(target.y_train, fraction, 0))

        def subset(seed, d, fraction=fraction):
            labelled = data_module.labelled_subset(d, fraction, seed)
            return data_module.repeated(labelled, rows) if rows else labelled

        for method, parts in methods.items():
            arms.append(Arm(
                f"{method}, {fraction * 100:g} % labels ({images} images)",
                train_data=subset,
                factors={"method": method, "label_fraction": fraction,
                         "labelled_images": images},
                **parts))
    return arms


def label_fraction_notes(experiment):
    """Per label fraction and method: the gain in test accuracy over
    training from scratch, paired by seed (same labelled subset)."""
    accuracy = {}
    for run in experiment.results:
        arm = next(a for a in experiment.arms if a.name == run.arm)
        key = (arm.factors["label_fraction"], arm.factors["method"])
        accuracy.setdefault(key, {})[run.seed] = run.test_accuracy
    notes = []
    fractions = sorted({fraction for fraction, _ in accuracy})
    for fraction in fractions:
        scratch = accuracy.get((fraction, LABEL_METHODS[0]), {})
        gains = []
        for method in LABEL_METHODS[1:]:
            runs = accuracy.get((fraction, method), {})
            seeds = sorted(set(runs) & set(scratch))
            if not seeds:
                continue
            gain = 100 * np.array([runs[s] - scratch[s] for s in seeds])
            gains.append(f"{method} {gain.mean():+.1f} ± {gain.std():.1f}")
        if gains:
            notes.append(f"{fraction * 100:g} % labels, points of test "
                         "accuracy over from scratch (paired by seed): "
                         + "; ".join(gains))
    for name, values in experiment.shared_seconds.items():
        if values:
            notes.append(f"{name}: once per seed, shared by the fractions "
                         "(in the time of the first arm that uses it), "
                         f"{np.mean(values):.0f} CPU s per seed")
    return notes


# Srivastava et al. 2014 (JMLR 15), Table 2: MNIST test error (%).
PAPER_MNIST_ERRORS = {
    "standard neural net": 1.60,
    "dropout NN (ReLU)": 1.25,
    "dropout NN + max-norm (ReLU)": 1.06,
}
PAPER = "Srivastava et al. 2014, Table 2"


def _unit_range(dataset):
    """Every input scaled to [0, 1] by its range on the training split (test
    values clipped to it).

    On MNIST, whose loader standardizes each pixel, this gives back the
    paper's inputs (intensity / 255) for every pixel that reaches 255 in
    the training images; it also keeps rare border pixels, whose tiny
    standard deviation turns one stroke into values of hundreds, bounded.
    """
    import dataclasses

    low = dataset.x_train.min(0)
    span = dataset.x_train.max(0) - low
    span[span == 0] = 1.0
    return dataclasses.replace(
        dataset,
        x_train=(dataset.x_train - low) / span,
        x_test=np.clip((dataset.x_test - low) / span, 0.0, 1.0),
        source=dataset.source + ", inputs scaled to [0, 1]",
    )


def dropout_paper(dataset, quick=False):
    """The lecture's dropout recipe against the plain network, scored like
    Srivastava et al. 2014 (Table 2, MNIST) and printed beside their figures.

    Meant for ``--dataset mnist`` (60,000 training images: 2 x 1024 ReLU,
    50 epochs); on smaller data sets (digits, ``--quick``) it runs a 2 x 256
    network with a small budget, as a smoke test of the same arms.
    """
    data = _unit_range(dataset)
    full = len(data.x_train) >= 50000
    width = (1024, 1024) if full else (256, 256)
    epochs = 50 if full else (3 if quick else 30)
    batch_size = 128
    steps = epochs * -(-len(data.x_train) // batch_size)
    max_norm = 3.0

    def adam():
        # The same schedule for every arm: cosine decay to 0 over the budget.
        return keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(1e-3, steps))

    def plain(seed, d):
        return mlp(d, seed, hidden=width)

    def recipe(seed, d):
        return mlp(d, seed, hidden=width, input_dropout=0.2,
                   hidden_dropout=0.5,
                   kernel_constraint=lambda: keras.constraints.MaxNorm(
                       max_norm, axis=0))

    def smoothed():
        return kreg.losses.LabelSmoothingCrossentropy(0.1, from_logits=True)

    def ema(seed, d):
        return [kreg.callbacks.EMA(decay=0.999, warmup=True)]

    names = ("plain network",
             f"dropout 0.2 in / 0.5 hidden + max-norm {max_norm:g}",
             "same + EMA (0.999) + label smoothing 0.1")
    arms = [
        Arm(names[0], plain, optimizer=adam),
        Arm(names[1], recipe, optimizer=adam),
        Arm(names[2], recipe, optimizer=adam, loss=smoothed, callbacks=ema),
    ]
    shape = f"{len(width)} x {width[0]}"
    paper = list(PAPER_MNIST_ERRORS.values())
    return Experiment(
        key="dropout_paper",
        title="Dropout on MNIST against Srivastava et al. 2014",
        question=(
            f"A {len(width)} x {width[0]} ReLU network, plain and with the "
            "lecture's dropout (0.2 on the inputs, 0.5 on the hidden units) "
            f"and a max-norm constraint ({max_norm:g}) on every unit's "
            "incoming weights, then also with an EMA of the weights and "
            "label smoothing. Adam (lr 1e-3, cosine decay to 0 over the "
            f"budget), batch {batch_size}, inputs in [0, 1]. "
            f"{PAPER} report MNIST test errors of "
            + "; ".join(f"{k}: {v:.2f} %"
                        for k, v in PAPER_MNIST_ERRORS.items())
            + " (their dropout rows: 3 hidden layers of 1024 ReLU units, "
            f"trained far longer; here {shape} units, {epochs} epochs, "
            f"{steps:,} updates)."
        ),
        dataset=data,
        arms=arms,
        epochs=epochs,
        batch_size=batch_size,
        references={
            names[0]: f"{paper[0]:.2f} % (standard neural net)",
            names[1]: f"{paper[2]:.2f} % (dropout + max-norm); "
                      f"{paper[1]:.2f} % (dropout alone)",
            names[2]: "not in the paper",
        },
    )


def error_notes(experiment, target=1.25):
    """Per arm: best test error over the epochs, and when (epoch, CPU
    minutes into the run) it first reached `target` % in every seed."""
    notes = []
    for arm in experiment.arms:
        runs = [r for r in experiment.results if r.arm == arm.name]
        if not runs:
            continue
        errors = [100 * (1 - np.asarray(r.curves["test_accuracy"]))
                  for r in runs]
        best = [e.min() for e in errors if len(e)]
        hits = []
        for run, error in zip(runs, errors):
            below = np.nonzero(error <= target)[0]
            if len(below):
                index = below[0]
                hits.append((index + 1, run.curves["cpu_seconds"][index]))
        line = (f"{arm.name}: final test error "
                f"{100 * (1 - np.mean([r.test_accuracy for r in runs])):.2f}"
                f" %, best epoch {np.mean(best):.2f} %")
        if len(hits) == len(runs):
            line += (f"; first at or below {target:.2f} % after "
                     f"{np.mean([h[0] for h in hits]):.1f} epochs, "
                     f"{np.mean([h[1] for h in hits]) / 60:.1f} CPU minutes "
                     "into the run")
        else:
            line += (f"; at or below {target:.2f} % in {len(hits)} of "
                     f"{len(runs)} runs")
        notes.append(line)
    return notes


def _image_side(dataset):
    """The side of the square grayscale images behind `dataset`'s flat
    inputs (8 for digits, 28 for MNIST); NotApplicable otherwise."""
    side = int(round(np.sqrt(dataset.input_dim)))
    if side * side != dataset.input_dim or side < 4:
        raise NotApplicable(
            f"{dataset.input_dim} inputs are not a square image")
    return side


def _with_label_noise(fraction):
    """``train_data(seed, dataset)``: `fraction` of the training labels
    replaced by classes drawn uniformly (the old class included)."""
    import dataclasses

    def train_data(seed, dataset):
        rng = np.random.RandomState(1000 + seed)
        labels = dataset.y_train.copy()
        replaced = rng.rand(len(labels)) < fraction
        labels[replaced] = rng.randint(0, dataset.num_classes,
                                       replaced.sum())
        return dataclasses.replace(dataset, y_train=labels)

    return train_data


def _image_model(dataset, seed, side, augmentations=(), hidden=(256, 256)):
    """Flat inputs -> (side, side, 1) image -> `augmentations` (zero-argument
    factories of layers, training only) -> flat -> the baseline MLP."""
    layers = [keras.Input((dataset.input_dim,)),
              keras.layers.Reshape((side, side, 1))]
    layers += [make() for make in augmentations]
    layers += [keras.layers.Flatten(), mlp(dataset, seed, hidden=hidden)]
    return keras.Sequential(layers)


def augmentation(dataset, quick=False):
    """Lecture topic "data augmentation": more (synthetic) training images
    against the same small training set; and noisy labels, with and
    without label smoothing.

    Inputs in [0, 1] (background 0), so shifted-in pixels are background.
    Simard et al.'s MNIST distortion (alpha 34, sigma 4 pixels on 28 x 28)
    is scaled to the image side s: sigma * s/28 keeps the field's
    correlation length in image widths; alpha * (s/28)^2 keeps the
    displacement's standard deviation (about alpha / (6.1 sigma)) in image
    widths.
    """
    side = _image_side(dataset)
    train_size = 300 if quick else 400
    data = _unit_range(dataset.subset(train_size, seed=0))
    scale = side / 28
    alpha, sigma = 34.0 * scale**2, 4.0 * scale
    shift = 1.0 / side if side <= 8 else 0.1  # one pixel at 8 x 8
    degrees = 15.0

    def translate(seed):
        return lambda: keras.layers.RandomTranslation(
            shift, shift, fill_mode="constant", seed=seed)

    def rotate(seed):
        return lambda: keras.layers.RandomRotation(
            degrees / 360, fill_mode="constant", seed=seed)

    def elastic(seed):
        return lambda: kreg.layers.ElasticDeformation(alpha, sigma,
                                                      seed=seed)

    def noise(seed):
        return lambda: kreg.layers.GaussianNoise(0.2, seed=seed)

    def build(*makers):
        def builder(seed, d):
            return _image_model(d, seed, side,
                                [make(seed) for make in makers])
        return builder

    def smoothed():
        return kreg.losses.LabelSmoothingCrossentropy(0.2, from_logits=True)

    noisy = _with_label_noise(0.2)
    pixels = shift * side
    arms = [
        Arm("baseline", build()),
        Arm("Gaussian noise 0.2 on inputs (kreg)", build(noise)),
        Arm(f"translation ±{pixels:g} px + rotation ±{degrees:g}° (Keras)",
            build(translate, rotate)),
        Arm(f"elastic α {alpha:.2g}, σ {sigma:.2g} px (kreg)",
            build(elastic)),
        Arm("all of the above", build(noise, translate, rotate, elastic)),
        Arm("20 % noisy labels, cross-entropy", build(), train_data=noisy),
        Arm("20 % noisy labels, label smoothing 0.2", build(),
            loss=smoothed, train_data=noisy),
    ]
    return Experiment(
        key="augmentation",
        title="Data augmentation and noisy labels",
        question=(
            f"A 256-256 ReLU network on {train_size} training images "
            f"({side} x {side}, inputs in [0, 1]). Each arm transforms the "
            "training images differently at every step (test images are "
            "never transformed): Gaussian noise, Keras's random shifts "
            "and rotations, kreg's elastic distortion (Simard et al. 2003, "
            "α and σ scaled to the image side), all of them. The last two "
            "arms train on labels of which 20 % were replaced by a "
            "uniformly drawn class, with plain cross-entropy and with label "
            "smoothing 0.2; all arms are tested on clean labels."
        ),
        dataset=data,
        arms=arms,
        epochs=8 if quick else 30,
    )


# The label experiments: a row per (method, fraction); their plot draws
# accuracy against the fraction, their notes the gain over from scratch.
LABEL_EXPERIMENTS = ("labels", "transfer_mnist_digits", "transfer_mnist_cnn")


def mnist_8x8(x):
    """MNIST images (flat 28 x 28, in [0, 1]) drawn like scikit-learn's
    8 x 8 digits: each image's ink box (pixels above 0.1) widened to a
    square about its centre (the digit's height fills the frame), sampled
    on a 32 x 32 grid and averaged over 4 x 4 blocks (the digits are
    32 x 32 bitmaps counted in 4 x 4 blocks)."""
    images = np.pad(x.reshape(-1, 28, 28), ((0, 0), (28, 28), (28, 28)))
    grid = np.arange(32) + 0.5
    out = np.zeros((len(images), 64), dtype="float32")
    for index, image in enumerate(images):
        rows = np.flatnonzero(image.max(1) > 0.1)
        cols = np.flatnonzero(image.max(0) > 0.1)
        if not rows.size:
            continue
        size = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        r = (rows[0] + rows[-1] + 1 - size) / 2 + grid * size / 32
        c = (cols[0] + cols[-1] + 1 - size) / 2 + grid * size / 32
        block = image[np.ix_(r.astype(int), c.astype(int))]
        out[index] = block.reshape(8, 4, 8, 4).mean((1, 3)).ravel()
    return out


def small_cnn(dataset, seed):
    """Conv(8) - pool - Conv(16) - pool - Dense(64) - output, ReLU."""
    def init():
        return _initializer("glorot_uniform", seed)

    return keras.Sequential([
        keras.Input(dataset.x_train.shape[1:]),
        keras.layers.Conv2D(8, 3, activation="relu",
                            kernel_initializer=init()),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu",
                            kernel_initializer=init()),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu", kernel_initializer=init()),
        keras.layers.Dense(dataset.num_classes, kernel_initializer=init()),
    ])


def transfer_mnist(dataset, quick=False):
    """Lecture: transfer where it is expected to help, with real data.

    Two experiments, each with the four arms of `labels` at 1, 5 and 20 %
    of the target's training labels (`quick`: 20 %, small budgets):
    (a) `transfer_mnist_digits`, a 256-256 ReLU network trained on 15,000
    MNIST images drawn as 8 x 8 digits (`mnist_8x8`), transferred to
    scikit-learn's digits (all 10 classes); (b) `transfer_mnist_cnn`, a
    small CNN (`small_cnn`) trained on 10,000 MNIST images of 0-4,
    transferred to 5-9 at 28 x 28 (a pool of 5,000 training images, 1,000
    test images). Every input is scaled to [0, 1] per pixel
    (`_unit_range`). Each labelled set is cycled to the same rows per
    epoch, so every run makes the same number of updates. The source
    network and the pretraining run once per seed, in the first arm that
    uses them, shared by the fractions (their CPU time is also in a note);
    pretraining sees the source and the target training images, without
    labels. Needs MNIST:
    ``--dataset mnist --data-dir DIR``.
    """
    if dataset.input_dim != 784 or dataset.num_classes != 10:
        raise NotApplicable(
            "it needs MNIST (28 x 28 images, 10 classes; --dataset mnist "
            f"--data-dir DIR); {dataset.name} has {dataset.input_dim} "
            f"inputs and {dataset.num_classes} classes")
    fractions = (0.2,) if quick else (0.01, 0.05, 0.2)
    images = _unit_range(dataset)
    small = _unit_range(dataset_with(
        images.subset(15000, seed=0, test_size=1000), mnist_8x8,
        "MNIST drawn 8 x 8"))
    square = dataset_with(images, lambda x: x.reshape(-1, 28, 28, 1),
                          "MNIST")
    return [
        _transfer_experiment(
            "transfer_mnist_digits",
            "Transfer from MNIST (8 x 8) to scikit-learn's digits",
            "a 256-256 ReLU network",
            lambda d, seed: mlp(d, seed, hidden=(256, 256)), small,
            _unit_range(data_module.load_digits()), fractions,
            rows=64 if quick else 512, epochs=2 if quick else 25,
            source_epochs=1 if quick else 5,
            pretrain_epochs=1 if quick else 3),
        _transfer_experiment(
            "transfer_mnist_cnn",
            "Transfer on MNIST with a CNN, digits 0-4 to 5-9",
            "a CNN (conv 8 and 16 filters 3 x 3, each with 2 x 2 max "
            "pooling, Dense 64, ReLU; pretrain_layerwise trains its Dense 64 "
            "only, on the output of the conv layers as initialized)",
            small_cnn,
            data_module.class_split(square, range(5)).subset(10000, seed=0),
            data_module.class_split(square, range(5, 10)).subset(
                5000, seed=0, test_size=1000),
            fractions, rows=64 if quick else 1024,
            epochs=2 if quick else 10,
            source_epochs=1 if quick else 3,
            pretrain_epochs=1 if quick else 3),
    ]


def dataset_with(dataset, transform, source):
    """A copy of `dataset` whose inputs (both splits) are `transform`ed,
    described as `source`."""
    import dataclasses

    return dataclasses.replace(
        dataset, x_train=transform(dataset.x_train),
        x_test=transform(dataset.x_test), source=source)


def _transfer_experiment(key, title, network, build, source, target,
                         fractions, rows, epochs, source_epochs,
                         pretrain_epochs, batch_size=32):
    """The four arms of `labels` from `source` to `target`, with the
    source network and the pretraining computed once per seed."""
    import functools
    import time

    unlabelled = np.concatenate([source.x_train, target.x_train])
    seconds = {"source network": [], "pretraining": []}

    @functools.cache
    def source_weights(seed):
        start = time.process_time()
        trained = build(source, seed)
        trained.compile(optimizer=default_optimizer(), loss=default_loss())
        trained.fit(source.x_train, source.y_train, epochs=source_epochs,
                    batch_size=batch_size, verbose=0)
        seconds["source network"].append(time.process_time() - start)
        return trained.get_weights()

    @functools.cache
    def pretrained_weights(seed):
        start = time.process_time()
        model = build(target, seed)
        kreg.models.pretrain_layerwise(
            model, unlabelled, epochs=pretrain_epochs, corruption=0.3,
            batch_size=batch_size, seed=seed, verbose=0)
        seconds["pretraining"].append(time.process_time() - start)
        return model.get_weights()

    def scratch(seed, d):
        return build(d, seed)

    def transfer(frozen):
        def build_transfer(seed, d):
            trained = build(source, seed)
            trained.set_weights(source_weights(seed))
            return _new_head(trained, d.num_classes, seed, frozen)
        return build_transfer

    def pretrained(seed, d):
        model = build(d, seed)
        model.set_weights(pretrained_weights(seed))
        return model

    freeze_epochs, epochs_per_step = _fine_tuning_stages(epochs)
    labelled = ", ".join(f"{f * 100:g} %" for f in fractions)
    return Experiment(
        key=key,
        title=title,
        question=(
            f"Target: {target.source}, {len(target.x_train)} training "
            f"images, of which {labelled} have labels (stratified, drawn "
            f"with the seed); {network} with the same {epochs} supervised "
            f"epochs of {rows} rows (the labelled images cycled), "
            f"{epochs * -(-rows // batch_size)} updates, in every arm. "
            "From scratch; transfer from the same network trained on "
            f"{len(source.x_train)} images of {source.source} "
            f"({source_epochs} epochs, once per seed) with a new head "
            f"trained alone, or with FineTuning (head alone for "
            f"{freeze_epochs} epochs, then the base unfrozen from the top in "
            f"2 steps of {epochs_per_step} epochs, learning rate 0.1 x the "
            "head's); or pretrain_layerwise (denoising autoencoders of the "
            f"Dense layers but the output, {pretrain_epochs} epochs each, "
            f"masking 0.3) on the {len(unlabelled)} source and target "
            "training images without labels, then supervised training. The "
            "lecture: transfer and pretraining help most when labels are "
            "few."
        ),
        dataset=target,
        arms=_label_arms(fractions, target, epochs, scratch, transfer,
                         pretrained, rows=rows),
        epochs=epochs,
        batch_size=batch_size,
        shared_seconds=seconds,
    )
