"""OptimizerWrapper: the base of kreg's optimizers that wrap another one."""

import contextlib

import keras


def set_untracked(optimizer, **attributes):
    """Sets attributes of `optimizer` that Keras's variable tracking must
    not see: lists of the model's weights (not optimizer state), caches,
    a callback's records. kreg sets every such attribute through here."""
    for name, value in attributes.items():
        object.__setattr__(optimizer, name, value)


class OptimizerWrapper(keras.optimizers.Optimizer):
    """An optimizer that adds per-step work around an inner optimizer.

    The model of `keras.optimizers.LossScaleOptimizer`: the inner optimizer
    updates the weights; the wrapper's `apply` (and, on JAX,
    `stateless_apply`) adds its own work inside the compiled train step.
    The learning rate, `iterations`, `scale_loss` and
    `finalize_variable_values` are the inner optimizer's; `variables` are
    the wrapper's own followed by the inner ones, and `get_config` nests
    the inner optimizer's config under ``"optimizer"``.

    Subclasses create their own variables in `build_own(var_list)`, which
    runs before the inner optimizer is built.

    `install_wrapper(model, cls, make)` puts a wrapper around a compiled
    model's optimizer (the one from ``make(model.optimizer)``) unless one of
    class `cls` is already in its chain of wrappers, and rebuilds the model's
    train function with the public ``model.make_train_function(force=True)``,
    so later fits reuse that train function: the first fit of the wrapped
    model compiles once. An installed wrapper saves and loads the inner
    optimizer's state only (`saves_inner_state_only`): checkpoints written
    while it is in place hold the optimizer state of the model's own
    optimizer, as without it, and load into the model compiled as before.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap (or a name or
            config accepted by `keras.optimizers.get`).
        name: optional name. Defaults to `None`.
    """

    def __init__(self, optimizer, name=None):
        if isinstance(optimizer, (str, dict)):
            optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "Invalid value received for argument `optimizer`. Expected "
                "a `keras.optimizers.Optimizer` instance. Received: "
                f"optimizer={optimizer!r}"
            )
        super().__init__(learning_rate=0.0, name=name)
        # The base class's own step count and learning rate are unused
        # (both are the inner optimizer's): not state of the wrapper.
        set_untracked(self, _unused_base_ids=frozenset(
            id(v) for v in super().variables))
        self.inner_optimizer = optimizer
        self.saves_inner_state_only = False

    def keep_built_variables(self, var_list):
        """Keeps the weights it is built with (`built_variables`) and their
        places (`positions`); a subclass's own `build` calls it too."""
        var_list = list(var_list)
        set_untracked(self, built_variables=var_list, _places={
            id(v): i for i, v in enumerate(var_list)})

    def build_own(self, var_list):
        """Creates the wrapper's own variables (`add_variable`)."""

    def build(self, var_list):
        self.keep_built_variables(var_list)
        self.build_own(var_list)
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def own_variables(self):
        """The wrapper's own state variables (`build_own`'s)."""
        return [v for v in super().variables
                if id(v) not in self._unused_base_ids]

    @property
    def variables(self):
        return self.own_variables + self.inner_optimizer.variables

    def variables_to_apply(self, trainable_variables):
        """The weights of an `apply` call: `trainable_variables`, or those
        it was built with when None; builds the wrapper on first use."""
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    f"{type(self).__name__}.apply without "
                    "`trainable_variables` needs a built optimizer: call "
                    "`optimizer.build(trainable_variables)` first.")
            return self.built_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        return trainable_variables

    def trained_variables(self):
        """The weights it was built with that are trainable now, in order:
        those of a step (`kreg.callbacks.FineTuning` freezes some)."""
        return [v for v in self.built_variables if v.trainable]

    def positions(self, variables):
        """The places of `variables` in the list it was built with."""
        return [self._places[id(v)] for v in variables]

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def save_own_variables(self, store):
        if self.saves_inner_state_only:
            self.inner_optimizer.save_own_variables(store)
        else:
            super().save_own_variables(store)

    def load_own_variables(self, store):
        if self.saves_inner_state_only:
            self.inner_optimizer.load_own_variables(store)
        else:
            super().load_own_variables(store)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)


def optimizer_chain(optimizer):
    """`optimizer`, then each wrapper's inner optimizer in turn."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def find_wrapper(optimizer, cls):
    """The instance of `cls` in `optimizer`'s chain of wrappers, or None."""
    return next((o for o in optimizer_chain(optimizer)
                 if isinstance(o, cls)), None)


def install_wrapper(model, cls, make, var_list=None):
    """The `cls` wrapper in `model`'s optimizer chain; if there is none,
    ``make(model.optimizer)`` becomes the model's optimizer, built on
    `var_list` (default: the weights the optimizer may train), and the
    model's train function is rebuilt around it."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            f"{cls.__name__} needs a compiled model (an optimizer): call "
            "`model.compile(...)` before `fit`."
        )
    found = find_wrapper(optimizer, cls)
    if found is not None:
        return found
    # Every weight a wrapper inside may train (not only the trainable ones
    # of the moment).
    if var_list is None:
        var_list = getattr(optimizer, "built_variables",
                           model.trainable_variables)
    strategy = getattr(model, "distribute_strategy", None)
    with (strategy.scope() if strategy is not None
          else contextlib.nullcontext()):
        if not optimizer.built:
            optimizer.build(var_list)
        wrapper = make(optimizer)
        wrapper.saves_inner_state_only = True
        wrapper.build(var_list)
    model.optimizer = wrapper
    if model.train_function is not None:
        model.make_train_function(force=True)
    return wrapper

