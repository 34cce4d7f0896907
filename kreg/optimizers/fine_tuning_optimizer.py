"""FineTuningOptimizer: a pre-trained base's own optimizer and learning rate."""

import numbers

import keras

from kreg.optimizers.optimizer_wrapper import OptimizerWrapper
from kreg.optimizers.optimizer_wrapper import set_untracked
from kreg.utils.validation import check_number


class _ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """`factor` times `optimizer`'s learning rate now (its schedule at its
    own `iterations`, so the base follows the head's schedule)."""

    def __init__(self, optimizer, factor):
        self.optimizer = optimizer
        self.factor = factor

    def __call__(self, step):
        return keras.ops.multiply(
            self.factor,
            keras.ops.convert_to_tensor(self.optimizer.learning_rate),
        )


def _clip_by_global_norm(grads, clipnorm):
    """`grads` scaled by ``clipnorm / max(norm, clipnorm)`` (Keras's
    `global_clipnorm`), over the base's and the head's together."""
    if not clipnorm:
        return grads
    present = [g for g in grads if g is not None]
    norm = keras.ops.sqrt(sum(keras.ops.sum(keras.ops.square(
        keras.ops.cast(g, "float32"))) for g in present))
    scale = clipnorm / keras.ops.maximum(norm, clipnorm)
    return [None if g is None else g * keras.ops.cast(scale, g.dtype)
            for g in grads]


@keras.saving.register_keras_serializable(package="kreg")
class FineTuningOptimizer(OptimizerWrapper):
    """Trains a pre-trained base with its own optimizer state and lower rate.

    The weights at `base_indices` of the list it is built with (the model's
    trainable weights, all unfrozen) are updated by a second
    optimizer of the inner optimizer's class and settings (made from its
    config), whose learning rate is at every step ``base_learning_rate_factor``
    times the inner one's of the same step (its schedule at the step, or
    the rate a callback set): discriminative learning rates (Howard & Ruder
    2018). Its own `iterations` start when the base first trains, so Adam's
    bias correction starts afresh for the base instead of treating its zero
    moments as long-trained ones. The other weights (the head) are updated
    by the inner optimizer, whose state is kept across stages. An inner
    ``global_clipnorm`` clips the base's and the head's gradients together.

    Any subset of the weights it was built with may be trainable at a step
    (a layer's ``trainable`` changed, then the public
    ``model.make_train_function(force=True)``): only those are updated, on
    every backend. `kreg.callbacks.FineTuning` installs it for a fit, keeps
    the base optimizer's state in its backup state (checkpoints hold the
    inner optimizer's, as without the wrapper) and at the end hands the
    base's moments to the inner optimizer (`hand_back_base_state`).

    Args:
        optimizer: the `keras.optimizers.Optimizer` for the head: a plain
            optimizer with a ``learning_rate`` (not a wrapper).
        base_indices: the positions of the base's weights in the list of
            weights the optimizer is built with (positions, not paths:
            Keras gives a loaded model's weights other paths).
        base_learning_rate_factor: float in (0, inf), the base's learning
            rate over the head's. Defaults to `0.1`.
        name: optional name. Defaults to `None`.
    """

    def __init__(self, optimizer, base_indices=(),
                 base_learning_rate_factor=0.1, name=None):
        super().__init__(optimizer, name=name)
        if isinstance(base_indices, (str, bytes)) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool)
                and i >= 0 for i in base_indices):
            raise TypeError(
                "Invalid value received for argument `base_indices`. "
                "Expected a list of non-negative ints. Received: "
                f"base_indices={base_indices!r}")
        self.base_indices = [int(i) for i in base_indices]
        self.base_learning_rate_factor = check_number(
            "base_learning_rate_factor", base_learning_rate_factor, 0.0,
            float("inf"), low_inclusive=False, high_inclusive=False)
        optimizer = self.inner_optimizer  # a name or config resolved
        config = optimizer.get_config()
        if "learning_rate" not in config or isinstance(
                optimizer, (OptimizerWrapper,
                            keras.optimizers.LossScaleOptimizer)):
            raise ValueError(
                "Invalid value received for argument `optimizer`. Expected "
                "a plain Keras optimizer with a learning rate (not a "
                "wrapper such as a LossScaleOptimizer, ClippedOptimizer or "
                "the EMA's AveragingOptimizer: put those around the "
                "FineTuningOptimizer). Received: "
                f"optimizer={optimizer!r}")
        config.update(name=f"{optimizer.name}_base", learning_rate=(
            _ScaledLearningRate(optimizer, self.base_learning_rate_factor)))
        self.base_optimizer = type(optimizer).from_config(config)

    def build_own(self, var_list):
        if any(i >= len(var_list) for i in self.base_indices):
            raise ValueError(
                f"`base_indices` {self.base_indices} do not fit the "
                f"{len(var_list)} weights the optimizer is built with.")
        set_untracked(self, _base_ids={
            id(var_list[i]) for i in self.base_indices})
        base, _ = self._split(var_list)
        self.base_optimizer.build(base)

    @property
    def own_variables(self):
        """The wrapper's own state: the base optimizer's variables."""
        return super().own_variables + self.base_optimizer.variables

    def _split(self, variables, grads=None):
        """``(base, head)`` lists of `variables` (or, with `grads`, of
        ``(grad, variable)`` pairs)."""
        items = variables if grads is None else list(zip(grads, variables))
        base, head = [], []
        for item in items:
            variable = item if grads is None else item[1]
            (base if id(variable) in self._base_ids else head).append(item)
        return base, head

    def apply(self, grads, trainable_variables=None):
        # Without `trainable_variables`: the weights trainable now.
        if trainable_variables is None and self.built:
            trainable_variables = self.trained_variables()
        super().apply(grads, trainable_variables)

    def before_inner_step(self, grads, weights):
        return _clip_by_global_norm(
            grads, self.inner_optimizer.global_clipnorm), None

    def apply_inner(self, grads, variables):
        base, head = self._split(variables, grads)
        # The base first: its rate is read from the inner optimizer's
        # schedule at the step, before the head's update counts it.
        for optimizer, pairs in ((self.base_optimizer, base),
                                 (self.inner_optimizer, head)):
            if pairs:
                optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

    def stateless_apply_inner(self, optimizer_values, grads, weights):
        # Each optimizer updates part of the weights: `apply_inner` in a
        # stateless scope of all of them.
        variables = self.trained_variables()
        if len(variables) != len(weights):
            raise ValueError(
                f"{len(weights)} trainable weights were passed, "
                f"but {len(variables)} of the weights this optimizer was "
                "built with are trainable: it was built for another model.")
        mapping = list(zip(variables, weights)) + list(
            zip(self.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.apply_inner(grads, variables)
        return ([scope.get_current_value(v) for v in variables],
                [scope.get_current_value(v) for v in self.variables])

    def hand_back_base_state(self):
        """Copies the base optimizer's per-weight state (moments) into the
        inner optimizer's state of the same weights, where it has some:
        the inner optimizer then continues the base's moments alone.
        Nothing changes when the base has not trained."""
        if int(keras.ops.convert_to_numpy(
                self.base_optimizer.iterations)) == 0:
            return
        inner = {v.name: v for v in self.inner_optimizer.variables}
        # Keras names a weight's state `<weight path, "/" as "_">_<name>`.
        prefixes = tuple(f"{v.path.replace('/', '_')}_"
                         for v in self.built_variables
                         if id(v) in self._base_ids)
        for variable in self.base_optimizer.variables:
            target = inner.get(variable.name)
            if (variable.name.startswith(prefixes) and target is not None
                    and tuple(target.shape) == tuple(variable.shape)):
                target.assign(keras.ops.copy(variable))

    def get_config(self):
        return {**super().get_config(), "base_indices": self.base_indices,
                "base_learning_rate_factor": self.base_learning_rate_factor}
