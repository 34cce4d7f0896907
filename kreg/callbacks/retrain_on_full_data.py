"""Second phase of early stopping: retrain on training + validation data."""

import math
import warnings

import keras
import numpy as np

from kreg.callbacks import _shared
from kreg.utils.validation import check_one_of

_ALGORITHMS = ("restart", "continue")
_LENGTHS = ("epochs", "steps", "scaled")


@keras.saving.register_keras_serializable(package="kreg")
class RetrainOnFullData(keras.callbacks.Callback):
    """After early stopping, trains again on the full data (two phases).

    Passed to ``model.fit`` together with a `kreg.callbacks.EarlyStopping`
    and the full data (training + validation). The ``fit`` runs phase 1 on the
    train/validation split as usual; when it ends, this callback runs phase 2
    on the full data, so one ``fit`` call runs both (the lecture: "danach noch
    mal mit Validation set bis zum beim early stopping bestimmten Zeitpunkt
    trainieren, plus evtl. ein bisschen laenger").

    - ``algorithm="restart"`` (Goodfellow et al., algorithm 7.2, default):
      from the initial weights and a fresh optimizer state (the values the
      optimizer variables, iteration counter included, had when phase 1
      began), train for

      - ``length="epochs"``: ``best_epoch + 1`` epochs (default);
      - ``length="steps"``: the same number of optimizer steps as phase 1
        took up to its best epoch, rounded to whole epochs;
      - ``length="scaled"``: ``(best_epoch + 1) * n_full / n_train`` epochs
        (rounded up), "a bit longer because there is more data".
    - ``algorithm="continue"`` (algorithm 7.3): from the weights phase 1 left
      (the best ones with ``restore_best_weights=True``), train on the full
      data one epoch at a time until the loss on the validation part
      (``validation_data``) falls below the training loss logged at the best
      epoch, at most ``max_epochs`` epochs.

    After ``fit``, ``retrain_epochs`` is the number of phase-2 epochs and
    ``retrain_history`` its `History`. The History returned by ``fit`` holds
    both phases: phase-2 epochs are appended to each list, a ``phase`` list
    (1 or 2 per epoch) tells them apart, and keys missing in one phase (e.g.
    ``val_loss`` in phase 2) are NaN there. Phase 2 prints its own progress
    bar with the verbosity of the ``fit``.

    Args:
        x: full input data: an array (or list/dict of arrays) or a
            ``tf.data.Dataset`` yielding ``(x, y)`` batches.
        y: full targets when ``x`` is an array. Defaults to `None`.
        algorithm: `"restart"` (7.2) or `"continue"` (7.3). Defaults to
            `"restart"`.
        length: for `"restart"`: `"epochs"`, `"steps"` or `"scaled"`.
            Defaults to `"epochs"`.
        batch_size: batch size for array data; pass the one given to ``fit``.
            Defaults to `None` (Keras's 32).
        validation_data: for `"continue"`: the validation part ``(x_val,
            y_val)`` (or a dataset) whose loss ends phase 2. Defaults to
            `None`.
        max_epochs: for `"continue"`: the cap on phase-2 epochs. Defaults to
            `100`.
        callbacks: callbacks for phase 2 (e.g. a ``ModelCheckpoint``).
            Defaults to `None`.

    Example:

    ```python
    stop = kreg.callbacks.EarlyStopping(patience=5, restore_best_weights=True)
    retrain = kreg.callbacks.RetrainOnFullData(x_all, y_all, batch_size=64)
    history = model.fit(x_train, y_train, batch_size=64, epochs=200,
                        validation_data=(x_val, y_val),
                        callbacks=[stop, retrain])
    print(stop.best_epoch, retrain.retrain_epochs)  # retrain = best + 1
    ```

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.8, algorithms 7.2 and 7.3.
    """

    def __init__(self, x, y=None, algorithm="restart", length="epochs",
                 batch_size=None, validation_data=None, max_epochs=100,
                 callbacks=None):
        super().__init__()
        if x is None:
            raise ValueError(
                "Invalid value received for argument `x`. Expected the full "
                "data (arrays or a dataset). Received: x=None"
            )
        check_one_of("algorithm", algorithm, _ALGORITHMS)
        check_one_of("length", length, _LENGTHS)
        for name, value in (("batch_size", batch_size),
                            ("max_epochs", max_epochs)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int)
                or value < 1
            ):
                raise ValueError(
                    f"Invalid value received for argument `{name}`. Expected "
                    f"a positive integer. Received: {name}={value!r}"
                )
        if algorithm == "continue" and validation_data is None:
            raise ValueError(
                "Invalid value received for argument `validation_data`. "
                "algorithm='continue' (7.3) stops when the loss on the "
                "validation part falls below the training loss of the best "
                "epoch, so it needs that part. Received: validation_data=None"
            )
        self.x = x
        self.y = y
        self.algorithm = algorithm
        self.length = length
        self.batch_size = batch_size
        self.validation_data = validation_data
        self.max_epochs = max_epochs
        self.callbacks = list(callbacks or [])
        self.retrain_epochs = None
        self.retrain_history = None

    # Phase 1 ---------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._check_data()
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._initial_weights = self.model.get_weights()
        self._initial_optimizer = (
            [keras.ops.convert_to_numpy(v.value) for v in optimizer.variables]
            if optimizer is not None else []
        )
        self._phase1_logs = []
        self._phase1_history = self.model.history
        self.retrain_epochs = None
        self.retrain_history = None

    def on_epoch_end(self, epoch, logs=None):
        self._phase1_logs.append(dict(logs or {}))

    # Phase 2 ---------------------------------------------------------------
    def on_train_end(self, logs=None):
        stop = _shared.lookup(self, "early_stopping")
        if stop is None:
            raise ValueError(
                "RetrainOnFullData needs a kreg.callbacks.EarlyStopping in "
                "the same `fit` call (it reads the best epoch from it)."
            )
        if not any(k.startswith("val_") for row in self._phase1_logs
                   for k in row):
            raise ValueError(
                "RetrainOnFullData: the first phase had no validation data. "
                "Pass `validation_data` or `validation_split` to `fit`."
            )
        if stop.best_epoch is None:
            raise ValueError(
                "RetrainOnFullData: EarlyStopping never saw its monitored "
                f"value `{stop.monitor}`; no best epoch to retrain for."
            )
        stop._finish()  # restore the best weights before phase 2
        verbose = self.params.get("verbose", 0) if self.params else 0
        if self.algorithm == "restart":
            history = self._restart(stop.best_epoch, verbose)
        else:
            history = self._continue(stop.best_epoch, verbose)
        self.retrain_history = history
        self.retrain_epochs = len(history.epoch) if history else 0
        self._merge_histories(history)

    def _restart(self, best_epoch, verbose):
        self.model.set_weights(self._initial_weights)
        optimizer = self.model.optimizer
        for variable, value in zip(optimizer.variables,
                                   self._initial_optimizer):
            variable.assign(value)
        epochs = best_epoch + 1
        if self.length != "epochs":
            train_steps = self.params.get("steps")
            full_steps = self._full_steps()
            if not train_steps or not full_steps:
                raise ValueError(
                    f"RetrainOnFullData(length={self.length!r}) needs the "
                    "number of batches per epoch of both data sets; use "
                    "length='epochs' with data of unknown size."
                )
            if self.length == "steps":
                epochs = max(1, round(epochs * train_steps / full_steps))
            else:
                epochs = math.ceil(epochs * full_steps / train_steps)
        if verbose:
            print(f"Phase 2: retraining on the full data from the initial "
                  f"weights for {epochs} epochs")
        return self._fit(epochs, verbose, self.callbacks)

    def _continue(self, best_epoch, verbose):
        target = float(self._phase1_logs[best_epoch]["loss"])
        loss = self._validation_loss()
        if loss < target:
            return None
        if verbose:
            print(f"Phase 2: continuing on the full data until the "
                  f"validation-part loss < {target:.6g} (at most "
                  f"{self.max_epochs} epochs)")
        stop = _StopBelow(target, self._validation_loss)
        return self._fit(self.max_epochs, verbose, self.callbacks + [stop])

    def _fit(self, epochs, verbose, callbacks):
        kwargs = dict(epochs=epochs, verbose=verbose, callbacks=callbacks)
        if _is_dataset(self.x):
            return self.model.fit(self.x, **kwargs)
        if self.batch_size is None:
            # Keras does not tell callbacks the batch size of `fit`.
            warnings.warn(
                "RetrainOnFullData: no `batch_size` given; the second phase "
                "uses Keras's default of 32, which may differ from the first "
                "phase's. Pass RetrainOnFullData the batch_size given to "
                "`fit`.",
                stacklevel=2,
            )
        return self.model.fit(self.x, self.y, batch_size=self.batch_size,
                              **kwargs)

    def _validation_loss(self):
        data = self.validation_data
        if isinstance(data, (tuple, list)):
            result = self.model.evaluate(*data, batch_size=self.batch_size,
                                         verbose=0, return_dict=True)
        else:
            result = self.model.evaluate(data, verbose=0, return_dict=True)
        return float(result["loss"])

    def _merge_histories(self, history):
        outer = self._phase1_history
        if outer is None:
            return
        phase1 = len(outer.epoch)
        phase2 = [] if history is None else list(history.epoch)
        logs2 = {} if history is None else history.history
        keys = list(outer.history) + [k for k in logs2
                                      if k not in outer.history]
        for key in keys:
            first = list(outer.history.get(key, [math.nan] * phase1))
            second = list(logs2.get(key, [math.nan] * len(phase2)))
            outer.history[key] = first + second
        outer.history["phase"] = [1] * phase1 + [2] * len(phase2)
        outer.epoch = list(outer.epoch) + phase2
        self.model.history = outer

    # Checks ----------------------------------------------------------------
    def _check_data(self):
        if _is_dataset(self.x):
            return
        inputs = self.x
        first = inputs if not isinstance(inputs, (list, tuple, dict)) else (
            list(inputs.values())[0] if isinstance(inputs, dict)
            else inputs[0]
        )
        n = np.shape(first)[0] if np.ndim(first) else 0
        if self.y is None:
            raise ValueError(
                "Invalid value received for argument `y`. Expected targets "
                "for the array inputs `x`. Received: y=None"
            )
        if np.shape(self.y)[0] != n:
            raise ValueError(
                f"RetrainOnFullData: `x` has {n} samples but `y` has "
                f"{np.shape(self.y)[0]}."
            )
        expected = getattr(self.model, "input_shape", None)
        if isinstance(expected, tuple) and not isinstance(
            inputs, (list, tuple, dict)
        ):
            got = tuple(np.shape(inputs)[1:])
            want = tuple(expected[1:])
            if len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want, got)
            ):
                raise ValueError(
                    "RetrainOnFullData: the full data `x` does not match the "
                    f"model's input: samples of shape {got}, the model "
                    f"expects {want}."
                )

    def _full_steps(self):
        if _is_dataset(self.x):
            try:
                cardinality = int(self.x.cardinality())
            except Exception:
                return None
            return cardinality if cardinality > 0 else None
        first = self.x
        if isinstance(first, dict):
            first = list(first.values())[0]
        elif isinstance(first, (list, tuple)):
            first = first[0]
        return math.ceil(np.shape(first)[0] / (self.batch_size or 32))

    def get_config(self):
        # The data is not part of the config.
        return {
            "algorithm": self.algorithm,
            "length": self.length,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
        }


class _StopBelow(keras.callbacks.Callback):
    """Algorithm 7.3's loop condition, checked after every epoch."""

    def __init__(self, target, validation_loss):
        super().__init__()
        self.target = target
        self.validation_loss = validation_loss

    def on_epoch_end(self, epoch, logs=None):
        loss = self.validation_loss()
        if logs is not None:
            logs["val_part_loss"] = loss
        if loss < self.target:
            self.model.stop_training = True


def _is_dataset(x):
    return hasattr(x, "element_spec") or (
        hasattr(x, "__iter__") and not hasattr(x, "shape")
        and not isinstance(x, (list, tuple, dict))
    )
