"""OptimizerWrapper: the base of kreg's optimizers that wrap another one."""

import contextlib

import keras
from keras import ops


def set_untracked(optimizer, **attributes):
    """Sets attributes of `optimizer` that Keras's variable tracking must
    not see: lists of the model's weights (not optimizer state), caches,
    a callback's records. kreg sets every such attribute through here."""
    for name, value in attributes.items():
        object.__setattr__(optimizer, name, value)


class OptimizerWrapper(keras.optimizers.Optimizer):
    """An optimizer that adds per-step work around an inner optimizer.

    The model of `keras.optimizers.LossScaleOptimizer`: the inner optimizer
    updates the weights; the wrapper adds its own work inside the compiled
    train step. The learning rate, `iterations`, `scale_loss` and
    `finalize_variable_values` are the inner optimizer's; `variables` are
    the wrapper's own (`own_variables`) followed by the inner ones, and
    `get_config` nests the inner optimizer's config under ``"optimizer"``.

    `apply` and (on JAX) `stateless_apply` run the same three steps, which
    subclasses fill in:

    1. ``before_inner_step(grads, weights)`` returns the gradients for the
       inner optimizer and whether it steps (a boolean scalar; None:
       always);
    2. ``apply_inner(grads, variables)`` (``stateless_apply_inner`` in
       `stateless_apply`) lets the inner optimizer update the weights;
    3. ``after_inner_step(variables, weights, stepped)``, where a subclass
       defines it, sees the updated weights and whether the inner
       `iterations` moved (``stepped``).

    Subclasses create their own variables in `build_own(var_list)`, which
    runs before the inner optimizer is built. With `saves_inner_state_only`
    (set by `install_wrapper`) it saves and loads the inner optimizer's
    state only.

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

    # Building ------------------------------------------------------------
    def build_own(self, var_list):
        """Creates the wrapper's own variables (`add_variable`)."""

    def build(self, var_list):
        var_list = list(var_list)
        set_untracked(self, built_variables=var_list, _places={
            id(v): i for i, v in enumerate(var_list)})
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
                    "`optimizer.build(trainable_variables)` first. "
                    "Received: trainable_variables=None")
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

    # A step --------------------------------------------------------------
    def before_inner_step(self, grads, weights):
        """The gradients for the inner optimizer and whether it steps (a
        boolean scalar, or None: always). `weights` are the variables
        (`apply`) or their values (`stateless_apply`)."""
        return grads, None

    def apply_inner(self, grads, variables):
        """The inner optimizer's update of `variables`."""
        self.inner_optimizer.apply(grads, variables)

    def stateless_apply_inner(self, optimizer_values, grads, weights):
        """`apply_inner` on values: the new `weights` and the new values of
        `variables` (given as `optimizer_values`)."""
        count = len(self.own_variables)
        new_weights, new_inner = self.inner_optimizer.stateless_apply(
            optimizer_values[count:], grads, weights)
        return list(new_weights), optimizer_values[:count] + list(new_inner)

    # ``after_inner_step(variables, weights, stepped)``: a subclass's work
    # after the inner step (`weights`: the new values of `variables`;
    # `stepped`: whether the inner `iterations` moved). None: no such work.
    after_inner_step = None

    def apply(self, grads, trainable_variables=None):
        variables = self.variables_to_apply(trainable_variables)
        grads, steps = self.before_inner_step(list(grads), variables)
        if self.after_inner_step is not None:
            before = ops.copy(self.iterations)
        if steps is None:
            self.apply_inner(grads, variables)
        else:
            ops.cond(steps, lambda: self.apply_inner(grads, variables),
                     lambda: None)
        if self.after_inner_step is not None:
            stepped = ops.not_equal(ops.copy(self.iterations), before)
            self.after_inner_step(variables, variables, stepped)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """`apply` on values (JAX's train step): the new values of the
        weights (those trainable now) and of `variables`."""
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, {type(self).__name__} must be "
                "built. Call `optimizer.build(trainable_variables)` first.")
        variables = self.variables
        values = [ops.convert_to_tensor(v) for v in optimizer_variables]
        weights = [ops.convert_to_tensor(v) for v in trainable_variables]
        # The inner optimizer's variables are mapped too: a hook may read
        # them (an inner LossScaleOptimizer's scale, its `iterations`).
        with keras.StatelessScope(
                state_mapping=list(zip(variables, values))) as scope:
            grads, steps = self.before_inner_step(list(grads), weights)
            if self.after_inner_step is not None:
                before = ops.copy(self.iterations)
            values = [scope.get_current_value(v) for v in variables]

        def inner_step():
            return self.stateless_apply_inner(values, grads, weights)

        if steps is None:
            new_weights, new_values = inner_step()
        else:
            # A skipped step returns the old values, bit for bit. A cond
            # rather than a select of new and old values: XLA does not fuse
            # the select into the update, which would add a pass over every
            # weight and moment.
            new_weights, new_values = ops.cond(
                steps, inner_step, lambda: (weights, values))
        if self.after_inner_step is not None:
            with keras.StatelessScope(
                    state_mapping=list(zip(variables, new_values))) as scope:
                stepped = ops.not_equal(ops.copy(self.iterations), before)
                self.after_inner_step(self.trained_variables(), new_weights,
                                      stepped)
                new_values = [scope.get_current_value(v) for v in variables]
        return new_weights, new_values

    # Delegated to the inner optimizer -------------------------------------
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

    # Saving --------------------------------------------------------------
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
    """Puts a wrapper of class `cls` around a compiled model's optimizer,
    unless one is already in its chain of wrappers; returns that wrapper.

    The wrapper, ``make(model.optimizer)``, is built on `var_list`
    (default: every weight the optimizer may train) and becomes the
    model's optimizer; a train function the model has is rebuilt with the
    public ``model.make_train_function(force=True)``, so later fits reuse
    it: the first fit of the wrapped model compiles once. The wrapper saves
    and loads the inner optimizer's state only (`saves_inner_state_only`):
    checkpoints written while it is in place hold the optimizer state of
    the model's own optimizer, as without it, and load into the model
    compiled as before.
    """
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
