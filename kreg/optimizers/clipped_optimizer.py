"""ClippedOptimizer: gradient clipping and non-finite protection."""

import keras
import numpy as np
from keras import ops

from kreg.optimizers.optimizer_wrapper import OptimizerWrapper
from kreg.optimizers.optimizer_wrapper import optimizer_chain
from kreg.utils.validation import check_number
from kreg.utils.validation import check_one_of
from kreg.utils.validation import check_optional_positive

_NON_FINITE_MESSAGE = (
    "ClippedOptimizer: non-finite gradient (NaN or Inf); the step was not "
    "applied. Pass on_non_finite='skip' to skip such steps instead."
)


@keras.saving.register_keras_serializable(package="kreg")
class ClippedOptimizer(OptimizerWrapper):
    """Clips the gradients, then lets any Keras optimizer apply them.

    Runs inside the compiled train step. On every step, in this order:

    1. a step whose gradients hold NaN or Inf is skipped (weights and the
       inner optimizer's state unchanged, `skipped_steps` counted), or
       raises with ``on_non_finite="raise"``;
    2. value clipping: ``g <- clip(g, -c, c)``;
    3. adaptive clipping (AGC) per output unit:
       ``g <- g * lambda * max(||w||, eps) / ||g||`` where larger;
    4. norm clipping per tensor: ``g <- g * c / ||g||`` where ``||g|| > c``;
    5. global-norm clipping: ``g <- g * c / max(G, c)``,
       ``G = sqrt(sum_i ||g_i||^2)``.

    A gradient below a threshold passes bit for bit. `grad_norm`,
    `clipped_steps`, `skipped_steps` and `variable_grad_norms` are readable
    after any step, and `kreg.callbacks.GradientMonitor` logs them. How it
    acts under `tf.distribute`, mixed precision and `jit_compile` is in
    docs/clipping.md.

    Args:
        optimizer: the optimizer to wrap (or a name or config). It must not
            clip as well (a `ValueError` names its argument).
        clipvalue: bound for value clipping. Defaults to `None`.
        clipnorm: bound on each gradient's L2 norm. Defaults to `None`.
        global_clipnorm: bound on the L2 norm of all gradients together.
            Defaults to `None`.
        agc_factor: the AGC factor `lambda` (Brock et al.: 0.01 to 0.16).
            Defaults to `None`.
        agc_epsilon: the smallest weight norm AGC uses. Defaults to `1e-3`.
        on_non_finite: `"skip"`, `"apply"` (measure only) or `"raise"`.
            Defaults to `"skip"`.
        name: optional name. Defaults to `None`.

    Example:

    >>> opt = ClippedOptimizer(keras.optimizers.SGD(1.0), clipnorm=2.0)
    >>> w = keras.Variable([0.0, 0.0, 0.0, 0.0])
    >>> opt.apply([keras.ops.array([0.5, 2.0, -3.0, 4.0])], [w])
    >>> # w is now -[0.1849, 0.7396, -1.1094, 1.4792]

    Reference:
        - Pascanu et al., 2013. On the difficulty of training recurrent
          neural networks. https://arxiv.org/abs/1211.5063
        - Brock et al., 2021. High-Performance Large-Scale Image Recognition
          Without Normalization. https://arxiv.org/abs/2102.06171
    """

    def __init__(
        self,
        optimizer,
        clipvalue=None,
        clipnorm=None,
        global_clipnorm=None,
        agc_factor=None,
        agc_epsilon=1e-3,
        on_non_finite="skip",
        name=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                "ClippedOptimizer does not take the arguments "
                f"{sorted(kwargs)}; set them on the inner `optimizer`. "
                f"Received: {kwargs}"
            )
        clip_kwargs = {
            "clipvalue": check_optional_positive("clipvalue", clipvalue),
            "clipnorm": check_optional_positive("clipnorm", clipnorm),
            "global_clipnorm": check_optional_positive(
                "global_clipnorm", global_clipnorm
            ),
        }
        agc_factor = check_optional_positive("agc_factor", agc_factor)
        agc_epsilon = check_number(
            "agc_epsilon", agc_epsilon, low=0, low_inclusive=False
        )
        check_one_of("on_non_finite", on_non_finite,
                     ("skip", "raise", "apply"))
        # The base class sees no clipping arguments: this wrapper does the
        # clipping itself (the base class would clip per replica).
        super().__init__(optimizer, name=name)
        clips = {k: v for k, v in clip_kwargs.items() if v is not None}
        if agc_factor is not None:
            clips["agc_factor"] = agc_factor
        if clips:
            _refuse_inner_clipping(self.inner_optimizer, clips)
        self.clipvalue = clip_kwargs["clipvalue"]
        self.clipnorm = clip_kwargs["clipnorm"]
        self.global_clipnorm = clip_kwargs["global_clipnorm"]
        self.agc_factor = agc_factor
        self.agc_epsilon = agc_epsilon
        self.on_non_finite = on_non_finite

    # Building ------------------------------------------------------------
    def build_own(self, var_list):
        # Few, small variables: each one costs a little on every
        # `train_on_batch` call (JAX state hand-over).
        self._norm_stats = self.add_variable(
            shape=(2,), dtype="float32", aggregation="only_first_replica",
            name="norm_stats",
        )  # [last pre-clip global norm, sum over applied steps]
        self._step_counts = self.add_variable(
            shape=(3,), dtype="int32", aggregation="only_first_replica",
            name="step_counts",
        )  # [seen, clipped, skipped]
        self._variable_grad_norms = self.add_variable(
            shape=(len(var_list),), dtype="float32",
            aggregation="only_first_replica", name="variable_grad_norms",
        )

    @property
    def grad_norm(self):
        """Pre-clip global gradient norm of the last step."""
        return self._norm_stats[0]

    @property
    def variable_grad_norms(self):
        """Pre-clip norm of each trainable variable's gradient, last step."""
        return self._variable_grad_norms

    @property
    def grad_norm_sum(self):
        """Sum of the pre-clip global norms of all applied steps."""
        return self._norm_stats[1]

    @property
    def seen_steps(self):
        """Number of steps whose gradients reached this wrapper."""
        return self._step_counts[0]

    @property
    def clipped_steps(self):
        """Number of steps in which clipping changed some gradient."""
        return self._step_counts[1]

    @property
    def skipped_steps(self):
        """Number of steps skipped for non-finite gradients."""
        return self._step_counts[2]

    # The gradient transformation ----------------------------------------
    def _loss_scale(self):
        """The inner LossScaleOptimizer's current scale, or None."""
        if isinstance(self.inner_optimizer,
                      keras.optimizers.LossScaleOptimizer):
            return self.inner_optimizer.dynamic_scale
        return None

    def clip_gradients(self, grads, weights=None):
        """Applies stages 2-5 to `grads`; returns `(grads, statistics)`.

        Args:
            grads: list of gradient tensors (entries may be `None`).
            weights: list of the matching variables or their values; needed
                only for adaptive clipping.

        Returns:
            The clipped gradients (same structure, `None` kept) and a dict
            with `finite` (bool scalar: every entry finite and the squared
            global norm representable in float32), `norm` (pre-clip
            global norm), `norms` (pre-clip norm per gradient, 0 for `None`)
            and `clipped` (bool scalar: some stage changed some gradient).
        """
        if keras.backend.backend() == "torch" and self.agc_factor is None:
            from kreg.optimizers import _torch_clipping

            if _torch_clipping.supports(grads):
                return _torch_clipping.clip_gradients(
                    grads, self.clipvalue, self.clipnorm, self.global_clipnorm
                )
        positions = [i for i, g in enumerate(grads) if g is not None]
        tensors = [grads[i] for i in positions]
        squares = [_sum_of_squares(g) for g in tensors]
        stacked = ops.stack(squares)
        total_square = ops.sum(stacked)
        norm = ops.sqrt(total_square)
        # NaN and Inf entries make the float32 sum of squares non-finite;
        # so does a finite gradient whose norm exceeds ~1.8e19 (its square
        # overflows): it counts as non-finite too. One pass over the
        # gradients serves both the norm and the check.
        finite = ops.isfinite(total_square)
        if len(positions) == len(grads):
            norms = ops.sqrt(stacked)
        else:
            all_squares = [ops.zeros((), "float32")] * len(grads)
            for i, square in zip(positions, squares):
                all_squares[i] = square
            norms = ops.sqrt(ops.stack(all_squares))

        acted = []
        changed = False
        if self.clipvalue is not None:
            bound = self.clipvalue
            acted.extend(
                ops.greater(ops.max(ops.abs(g)), bound) for g in tensors
            )
            tensors = [ops.clip(g, -bound, bound) for g in tensors]
            changed = True
        if self.agc_factor is not None:
            if weights is None:
                raise ValueError(
                    "Adaptive clipping (`agc_factor`) needs the weights. "
                    "Received: weights=None"
                )
            clipped = []
            for g, i in zip(tensors, positions):
                g, unit_acted = self._agc(g, weights[i])
                clipped.append(g)
                acted.append(unit_acted)
            tensors = clipped
            changed = True
        if self.clipnorm is not None:
            bound = self.clipnorm
            if changed:
                squares = [_sum_of_squares(g) for g in tensors]
            clipped = []
            for g, square in zip(tensors, squares):
                tensor_norm = ops.sqrt(square)
                over = ops.greater(tensor_norm, bound)
                acted.append(over)
                clipped.append(_scale(g, over, bound / tensor_norm))
            tensors = clipped
            changed = True
        if self.global_clipnorm is not None:
            bound = self.global_clipnorm
            total = norm
            if changed:
                total = ops.sqrt(
                    ops.sum(ops.stack([_sum_of_squares(g) for g in tensors]))
                )
            over = ops.greater(total, bound)
            acted.append(over)
            factor = ops.where(over, bound / total, 1.0)
            tensors = _multiply(tensors, factor)

        clipped_grads = list(grads)
        for i, g in zip(positions, tensors):
            clipped_grads[i] = g
        if acted:
            any_acted = ops.any(ops.stack(acted))
        else:
            any_acted = ops.convert_to_tensor(False)
        statistics = {
            "finite": finite,
            "norm": norm,
            "norms": norms,
            "clipped": any_acted,
        }
        return clipped_grads, statistics

    def _agc(self, g, w):
        w = ops.cast(ops.convert_to_tensor(w), "float32")
        g32 = ops.cast(g, "float32")
        if len(g.shape) > 1:
            axes = tuple(range(len(g.shape) - 1))
            keepdims = True
        else:
            axes = None
            keepdims = False
        w_norm = ops.sqrt(ops.sum(ops.square(w), axis=axes, keepdims=keepdims))
        g_norm = ops.sqrt(
            ops.sum(ops.square(g32), axis=axes, keepdims=keepdims)
        )
        max_norm = self.agc_factor * ops.maximum(w_norm, self.agc_epsilon)
        over = ops.greater(g_norm, max_norm)
        factor = ops.where(over, max_norm / g_norm, 1.0)
        return g * ops.cast(factor, g.dtype), ops.any(over)

    # Applying ------------------------------------------------------------
    def _transform(self, grads, weights):
        """Unscales (inner LossScaleOptimizer), clips, rescales."""
        scale = self._loss_scale()
        if scale is None:
            return self.clip_gradients(grads, weights)
        unscaled = [None if g is None else g / ops.cast(scale, g.dtype)
                    for g in grads]
        clipped, statistics = self.clip_gradients(unscaled, weights)
        rescaled = [None if g is None else g * ops.cast(scale, g.dtype)
                    for g in clipped]
        return rescaled, statistics

    def _record(self, statistics, num_grads):
        finite = statistics["finite"]
        norm = ops.cast(statistics["norm"], "float32")
        self._norm_stats.assign(ops.stack([
            norm,
            self._norm_stats[1] + ops.where(finite, norm, 0.0),
        ]))
        norms = self._norms_of_all(statistics["norms"], num_grads)
        if norms is not None:
            self._variable_grad_norms.assign(norms)
        skipped = ops.logical_not(finite)
        if self.on_non_finite == "apply":
            skipped = ops.zeros((), "bool")
        self._step_counts.assign_add(ops.cast(ops.stack([
            ops.convert_to_tensor(True),
            ops.logical_and(statistics["clipped"], finite),
            skipped,
        ]), "int32"))

    def _norms_of_all(self, norms, num_grads):
        """`norms` (of the weights of a step) placed at the weights' places
        among those it was built with, 0 for frozen ones; None if unknown."""
        size = self._variable_grad_norms.shape[0]
        if num_grads == size:
            return norms
        trained = self.trained_variables()
        if num_grads != len(trained):
            return None
        positions = np.array([[i] for i in self.positions(trained)], "int32")
        return ops.scatter(positions, ops.cast(norms, "float32"), (size,))

    def _lets_inner_skip(self):
        # With on_non_finite="apply" every step goes to the inner optimizer.
        # An inner LossScaleOptimizer must see overflowing steps itself, to
        # lower its scale; it skips them (the weights stay untouched).
        return (self.on_non_finite == "apply"
                or self._loss_scale() is not None)

    def _raise_if_not_finite(self, finite):
        if self.on_non_finite != "raise" or self._lets_inner_skip():
            return
        backend = keras.backend.backend()
        if backend == "torch":
            if not bool(finite):
                raise FloatingPointError(_NON_FINITE_MESSAGE)
        elif backend == "jax":
            import jax

            # Ordered: on an accelerator the host callback runs
            # asynchronously and an unordered one's error is only logged;
            # an ordered one fails the next step's dispatch at the latest.
            jax.debug.callback(_raise_from_host, finite, ordered=True)
        elif backend == "tensorflow":
            import tensorflow as tf

            # XLA drops Assert ops; GradientMonitor raises after the batch.
            tf.debugging.Assert(finite, [_NON_FINITE_MESSAGE])

    def before_inner_step(self, grads, weights):
        """Clips `grads` and records the statistics; the inner optimizer
        steps when they are finite (or always, see `_lets_inner_skip`)."""
        clipped, statistics = self._transform(grads, weights)
        finite = statistics["finite"]
        self._raise_if_not_finite(finite)
        self._record(statistics, len(grads))
        return clipped, None if self._lets_inner_skip() else finite

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        trainable_variables = self.variables_to_apply(trainable_variables)
        backend = keras.backend.backend()
        if backend == "jax":
            self._jax_apply(grads, trainable_variables)
        elif backend == "tensorflow":
            self._tf_apply(grads, trainable_variables)
        elif backend == "torch":
            self._torch_apply(grads, trainable_variables)
        else:
            super().apply(grads, trainable_variables)

    def _torch_apply(self, grads, trainable_variables):
        """Eager `apply` on PyTorch: one host read of the health flag.

        `ops.cond` would read it too; reading it once here also lets the
        statistics be written without selects.
        """
        import torch

        clipped, statistics = self._transform(grads, trainable_variables)
        finite = bool(statistics["finite"])
        self._raise_if_not_finite(finite)
        with torch.no_grad():
            norm = statistics["norm"].to(torch.float32)
            norm_stats = self._norm_stats.value
            norm_stats[0] = norm
            counts = self._step_counts.value
            counts[0] += 1
            if finite:
                norm_stats[1] += norm
                counts[1] += statistics["clipped"].to(counts.dtype)
            elif self.on_non_finite != "apply":
                counts[2] += 1
            norms = self._norms_of_all(statistics["norms"], len(grads))
            if norms is not None:
                self._variable_grad_norms.value.copy_(norms)
        if finite or self._lets_inner_skip():
            self.apply_inner(clipped, trainable_variables)

    def _tf_apply(self, grads, trainable_variables):
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        if replicas == 1:
            super().apply(grads, trainable_variables)
            return
        # Clip the aggregated gradient: sum over replicas, clip, and hand
        # each replica 1/replicas of it (the inner optimizer sums again).
        positions = [i for i, g in enumerate(grads) if g is not None]
        reduced = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [grads[i] for i in positions]
        )
        total = list(grads)
        for i, g in zip(positions, reduced):
            total[i] = g
        clipped, statistics = self._transform(total, trainable_variables)
        finite = statistics["finite"]
        self._raise_if_not_finite(finite)
        self._record(statistics, len(grads))
        shares = [None if g is None else g / replicas for g in clipped]
        lets_inner_skip = self._lets_inner_skip()

        def merged(distribution, shares, finite):
            finite = distribution.experimental_local_results(finite)[0]

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self.apply_inner, args=(shares, trainable_variables)
                )

            if lets_inner_skip:
                apply_fn()
            else:
                ops.cond(finite, apply_fn, lambda: None)

        context.merge_call(merged, args=(shares, finite))

    def _jax_apply(self, grads, trainable_variables):
        """Eager `apply` on JAX, through the stateless path."""
        new_trainable, new_optimizer = self.stateless_apply(
            [v.value for v in self.variables],
            grads,
            [v.value for v in trainable_variables],
        )
        for variable, value in zip(trainable_variables, new_trainable):
            variable.assign(value)
        for variable, value in zip(self.variables, new_optimizer):
            variable.assign(value)

    # Serialization -------------------------------------------------------
    def get_config(self):
        return {
            **super().get_config(),
            "clipvalue": self.clipvalue,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "agc_factor": self.agc_factor,
            "agc_epsilon": self.agc_epsilon,
            "on_non_finite": self.on_non_finite,
        }


_CLIP_ARGUMENTS = ("clipvalue", "clipnorm", "global_clipnorm", "agc_factor")


def _refuse_inner_clipping(optimizer, clips):
    """Raises when an optimizer down the wrapper chain (``inner_optimizer``
    after ``inner_optimizer``) clips the gradients too: they would be
    clipped twice."""
    for depth, optimizer in enumerate(optimizer_chain(optimizer)):
        path = "optimizer" + ".inner_optimizer" * depth
        for argument in _CLIP_ARGUMENTS:
            value = getattr(optimizer, argument, None)
            if value is not None:
                own = ", ".join(f"{k}={v}" for k, v in clips.items())
                raise ValueError(
                    "Invalid value received for argument `optimizer`. "
                    "Expected an optimizer that does not clip gradients "
                    f"itself: this ClippedOptimizer clips them ({own}) and "
                    f"`{path}.{argument}` would clip them a second time. "
                    f"Set `{argument}` on one of the two only (e.g. "
                    f"{type(optimizer).__name__}() without it). Received: "
                    f"{path}={type(optimizer).__name__} with "
                    f"{argument}={value}"
                )


def _sum_of_squares(g):
    if keras.backend.standardize_dtype(g.dtype) != "float32":
        g = ops.cast(g, "float32")
    return ops.sum(ops.square(g))


def _scale(g, over, factor):
    """`g * factor` where `over`, else `g` itself (bit for bit)."""
    return _multiply([g], ops.where(over, factor, 1.0))[0]


def _multiply(tensors, factor):
    """Each tensor times the float32 scalar `factor`, in its own dtype.

    A factor of exactly 1 leaves a tensor unchanged bit for bit.
    """
    cast = {}
    result = []
    for g in tensors:
        dtype = keras.backend.standardize_dtype(g.dtype)
        if dtype not in cast:
            cast[dtype] = (
                factor if dtype == "float32" else ops.cast(factor, dtype)
            )
        result.append(g * cast[dtype])
    return result


def _raise_from_host(finite):
    if not bool(finite):
        raise FloatingPointError(_NON_FINITE_MESSAGE)

