"""FineTuning: train a pre-trained base frozen, then unfrozen from the top."""

import contextlib
import warnings

import keras

from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.optimizers.fine_tuning_optimizer import FineTuningOptimizer
from kreg.optimizers.optimizer_wrapper import find_wrapper
from kreg.optimizers.optimizer_wrapper import optimizer_chain
from kreg.optimizers.optimizer_wrapper import set_untracked
from kreg.utils.layers import leaf_layers
from kreg.utils.layers import walk_layers
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_number

_BATCH_NORMALIZATION = ("BatchNormalization", "SyncBatchNormalization")
_STATE_NAME = "kreg_fine_tuning"


@keras.saving.register_keras_serializable(package="kreg")
class FineTuning(keras.callbacks.Callback):
    """Transfer learning: a frozen pre-trained base, then unfrozen stepwise.

    For the first `freeze_epochs` epochs the base is frozen and only the
    rest of the model (the head) trains. Then the base's layers with weights
    are unfrozen from the top in `unfreeze_steps` blocks, one more block
    every `epochs_per_step` epochs, at ``base_learning_rate_factor`` times
    the head's learning rate of the same step, schedules and rate callbacks
    included (Howard & Ruder 2018, "gradual unfreezing" and "discriminative
    fine-tuning"; Yosinski et al. 2014). Batch normalization in the base
    stays frozen, so it runs in inference mode with the pre-trained
    statistics (Keras's fine-tuning convention), unless
    ``freeze_batch_normalization=False``.

    The stage is a function of the epoch, so a ``fit`` resumed by
    `BackupAndRestore` continues in its stage. Each change of stage calls
    ``model.make_train_function(force=True)``. For the fit, a
    `kreg.optimizers.FineTuningOptimizer` goes around the compiled optimizer
    (inside a `LossScaleOptimizer` or `ClippedOptimizer`): the head keeps
    its state, the base gets a second optimizer whose step count starts
    when it first trains.

    When the fit ends (early stopping included), every layer's `trainable`
    is the one it had before the fit and the model's optimizer is the
    compiled one, now with the base's moments: a ``.keras`` file saved then
    loads with its optimizer state, and a later ``fit`` trains as its own
    callbacks say. After a fit ended by an exception, this happens when the
    next ``fit`` with a `FineTuning` begins.

    Args:
        base: the pre-trained part: a layer or model inside the fitted model,
            or its name.
        freeze_epochs: int >= 0, epochs with the whole base frozen.
            Defaults to `1`.
        unfreeze_steps: int >= 1, the number of blocks the base is unfrozen
            in, top block first. Defaults to `1` (all at once).
        epochs_per_step: int >= 1, epochs between two blocks. Defaults to
            `1`.
        base_learning_rate_factor: float in (0, inf), the base's learning
            rate over the head's. Defaults to `0.1`.
        freeze_batch_normalization: keep the base's batch normalization
            frozen in every stage. Defaults to `True`.

    Example:

    ```python
    base = keras.models.load_model("pretrained.keras")  # without its head
    model = keras.Sequential([base, keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    model.fit(x, y, epochs=10, callbacks=[kreg.callbacks.FineTuning(
        base, freeze_epochs=3, unfreeze_steps=2, epochs_per_step=2)])
    ```
    """

    def __init__(self, base, freeze_epochs=1, unfreeze_steps=1,
                 epochs_per_step=1, base_learning_rate_factor=0.1,
                 freeze_batch_normalization=True):
        super().__init__()
        if not isinstance(base, (str, keras.layers.Layer)):
            raise TypeError(
                "Invalid value received for argument `base`. Expected a "
                "keras.layers.Layer (or Model) or a layer name. Received: "
                f"base={base!r}")
        self.base = base
        self.freeze_epochs = check_integer("freeze_epochs", freeze_epochs, 0)
        self.unfreeze_steps = check_integer("unfreeze_steps", unfreeze_steps,
                                            1)
        self.epochs_per_step = check_integer("epochs_per_step",
                                             epochs_per_step, 1)
        self.base_learning_rate_factor = check_number(
            "base_learning_rate_factor", base_learning_rate_factor, 0.0,
            float("inf"), low_inclusive=False, high_inclusive=False)
        self.freeze_batch_normalization = check_bool(
            "freeze_batch_normalization", freeze_batch_normalization)
        self.stage = None

    def unfrozen_blocks(self, epoch):
        """How many blocks of the base train in `epoch` (0-based)."""
        if epoch < self.freeze_epochs:
            return 0
        return min(self.unfreeze_steps,
                   1 + (epoch - self.freeze_epochs) // self.epochs_per_step)

    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                "FineTuning needs a compiled model: call `model.compile(...)` "
                "before `fit`.")
        # A FineTuning fit ended by an exception left its optimizer in.
        remove_fine_tuning_optimizer(model)
        if find_wrapper(model.optimizer, FineTuningOptimizer) is not None:
            raise ValueError(
                "The model is compiled with a FineTuningOptimizer: compile "
                "it with a plain optimizer to fit it with a FineTuning "
                "callback.")
        base = self._find_base(model)
        self._flags = [(layer, layer.trainable)
                       for layer in _nested_layers(base)]
        trainable = list(model.trainable_variables)
        self._blocks = self._base_blocks(model, base)
        try:
            base.trainable = True
            self._install_optimizer(model, trainable)
        except Exception:
            for layer, flag in self._flags:
                layer.trainable = flag
            raise
        self._training = False
        # The first epoch's stage before Keras compiles the train step; a
        # resumed fit changes it when its first epoch begins.
        self._set_stage(0, rebuild=True)

    def on_train_begin(self, logs=None):
        self._training = True
        registry.register_stateful(self)
        self._backup_folder = registry.backup_folder(self, None)
        self._resumed = False

    def on_test_begin(self, logs=None):
        if not self._training:  # `evaluate` or `predict`, not `fit`
            remove_fine_tuning_optimizer(self.model)

    def on_predict_begin(self, logs=None):
        self.on_test_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._set_stage(self.unfrozen_blocks(epoch), rebuild=True)
        if not self._resumed:
            # The base's optimizer state of an interrupted fit (the model's
            # own optimizer is in Keras's backup).
            self._resumed = True
            if self._backup_folder is None:
                if epoch > self.freeze_epochs:
                    warnings.warn(
                        f"FineTuning: training starts at epoch {epoch} "
                        "(resumed?) with the base unfrozen, but without a "
                        "kreg.callbacks.BackupAndRestore: the base's "
                        "optimizer state (moments, step count) starts over.",
                        stacklevel=2)
                return
            saved = state_files.resume_state(self._backup_folder,
                                             _STATE_NAME, epoch)
            if saved is None:
                return
            try:
                self.set_state({"base_optimizer": saved[1]})
            except ValueError as error:
                path = state_files.state_path(self._backup_folder,
                                              _STATE_NAME)
                raise ValueError(
                    f"The FineTuning state in {path!r}: {error} It belongs "
                    "to another model. Delete it to resume without it."
                ) from error

    def on_epoch_end(self, epoch, logs=None):
        if self._backup_folder is not None:
            self.write_state(self._backup_folder, epoch + 1)
        registry.finish_epoch(self, epoch)

    # State -----------------------------------------------------------------
    @property
    def state_name(self):
        """The name of its state in a backup folder."""
        return _STATE_NAME

    def get_state(self):
        """The variables of the base's optimizer (moments, step count) as
        NumPy arrays: ``{"base_optimizer": [...]}``."""
        return {"base_optimizer": [keras.ops.convert_to_numpy(v)
                                   for v in self._base_optimizer().variables]}

    def set_state(self, state):
        """Restores a state produced by `get_state` (during ``fit``)."""
        variables = self._base_optimizer().variables
        values = state["base_optimizer"]
        if len(values) != len(variables):
            raise ValueError(
                f"The FineTuning state holds {len(values)} optimizer values "
                f"but the base's optimizer has {len(variables)}.")
        for variable, value in zip(variables, values):
            variable.assign(value)

    def write_state(self, folder, epoch):
        """Writes `get_state()` to `folder` for a ``fit`` resumed at
        `epoch`."""
        state_files.save_state(folder, _STATE_NAME, {"epoch": epoch},
                               self.get_state()["base_optimizer"])

    def on_train_end(self, logs=None):
        if self._backup_folder is not None:
            state_files.delete_state(self._backup_folder, _STATE_NAME)
        self._training = False
        remove_fine_tuning_optimizer(self.model)

    def _base_optimizer(self):
        return find_wrapper(self.model.optimizer,
                            FineTuningOptimizer).base_optimizer

    def _set_stage(self, blocks, rebuild):
        if blocks == self.stage:
            return
        unfrozen = len(self._blocks) - blocks
        for index, block in enumerate(self._blocks):
            for layer in block:
                layer.trainable = index >= unfrozen
        for layer in self._batch_normalization:
            layer.trainable = False
        self.stage = blocks
        if rebuild and self.model.train_function is not None:
            self.model.make_train_function(force=True)

    def _find_base(self, model):
        if not isinstance(self.base, str):
            return self.base
        try:
            return model.get_layer(self.base)
        except ValueError:
            raise ValueError(
                "Invalid value received for argument `base`: the model has "
                f"no layer named {self.base!r}. Received: base={self.base!r}"
            ) from None

    def _base_blocks(self, model, base):
        layers = [layer for layer in leaf_layers(base) if layer.weights]
        in_model = {id(v) for v in model.weights}
        if not any(id(w) in in_model for layer in layers
                   for w in layer.weights):
            raise ValueError(
                "Invalid value received for argument `base`: its weights are "
                f"not weights of the fitted model {model.name!r}. "
                f"Received: base={self.base!r}")
        self._batch_normalization = [
            layer for layer in layers
            if type(layer).__name__ in _BATCH_NORMALIZATION
            and self.freeze_batch_normalization]
        layers = [layer for layer in layers
                  if layer not in self._batch_normalization]
        if len(layers) < self.unfreeze_steps:
            raise ValueError(
                "Invalid value received for argument `unfreeze_steps`: the "
                f"base has {len(layers)} layers with weights to unfreeze. "
                f"Received: unfreeze_steps={self.unfreeze_steps}")
        size, extra = divmod(len(layers), self.unfreeze_steps)
        blocks, start = [], 0
        for index in range(self.unfreeze_steps):
            stop = start + size + (1 if index < extra else 0)
            blocks.append(layers[start:stop])
            start = stop
        return blocks

    def _install_optimizer(self, model, trainable):
        """Puts a FineTuningOptimizer around the plain optimizer at the
        bottom of the model's chain of optimizers, built for the weights
        `trainable` before the fit and every weight the stages will train;
        the plain optimizer is built on `trainable`, as by a plain fit."""
        self._set_stage(self.unfreeze_steps, rebuild=False)
        trained = {id(v) for v in model.trainable_variables}
        self.stage = None
        known = trained | {id(v) for v in trainable}
        var_list = [v for v in model.variables if id(v) in known]
        base_ids = {id(v) for block in self._blocks for layer in block
                    for v in layer.trainable_variables}
        chain = list(optimizer_chain(model.optimizer))
        strategy = getattr(model, "distribute_strategy", None)
        with (strategy.scope() if strategy is not None
              else contextlib.nullcontext()):
            if not chain[-1].built:
                chain[-1].build(trainable)
            if not chain[0].built:
                chain[0].build(var_list)
            for wrapper in chain[:-1]:
                built = getattr(wrapper, "built_variables", None)
                if built is not None and not trained <= {id(v)
                                                         for v in built}:
                    raise ValueError(
                        f"The model's optimizer {wrapper.name!r} was built "
                        "without the base's weights (an EMA or "
                        "GradientMonitor listed before FineTuning, or from "
                        "an earlier fit with the base frozen): list "
                        "FineTuning first, or compile the model again.")
            wrapper = FineTuningOptimizer(
                chain[-1], [i for i, v in enumerate(var_list)
                            if id(v) in base_ids],
                self.base_learning_rate_factor)
            wrapper.saves_inner_state_only = True
            # What `remove_fine_tuning_optimizer` puts back after the fit.
            set_untracked(wrapper, trainable_flags=self._flags)
            wrapper.build(var_list)
        if len(chain) == 1:
            model.optimizer = wrapper
        else:
            chain[-2].inner_optimizer = wrapper
        if model.train_function is not None:
            model.make_train_function(force=True)

    def get_config(self):
        base = self.base if isinstance(self.base, str) else self.base.name
        return {"base": base, "freeze_epochs": self.freeze_epochs,
                "unfreeze_steps": self.unfreeze_steps,
                "epochs_per_step": self.epochs_per_step,
                "base_learning_rate_factor": self.base_learning_rate_factor,
                "freeze_batch_normalization": self.freeze_batch_normalization}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _nested_layers(layer):
    """`layer` and the layers in it, each before its own (a model's
    `layers`; another layer's sublayers)."""
    if isinstance(layer, keras.Model):
        children = layer.layers
    else:
        children = [child for child, chain in walk_layers(layer)
                    if len(chain) == 2]
    return [layer] + [nested for child in children
                      for nested in _nested_layers(child)]


def remove_fine_tuning_optimizer(model):
    """Takes a FineTuning callback's FineTuningOptimizer out of `model`'s
    optimizer chain: the base's optimizer state goes to the plain
    optimizer, and the layers' `trainable` flags back to those before the
    fit."""
    chain = list(optimizer_chain(getattr(model, "optimizer", None)))
    for parent, wrapper in zip([None] + chain, chain):
        if hasattr(wrapper, "trainable_flags"):
            break
    else:
        return
    for layer, trainable in wrapper.trainable_flags:
        layer.trainable = trainable
    wrapper.hand_back_base_state()
    if parent is None:
        model.optimizer = wrapper.inner_optimizer
    else:
        parent.inner_optimizer = wrapper.inner_optimizer
    if model.train_function is not None:
        model.make_train_function(force=True)
