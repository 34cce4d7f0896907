"""The EMA's update engine: one step of the average per optimizer step,
fused into the compiled train step where it can be (JAX, TensorFlow), else
one compiled call per step (a CUDA graph replay on PyTorch with CUDA)."""

import keras
import numpy as np

from kreg.callbacks._bulk_variables import (
    BulkVariables,
    _copy_all,
    _jax_jitted,
    copies,
    copy_value,
)


def _torch_tensor(variable):
    """The torch tensor that stores a Keras variable. Keras's
    `Variable.value` costs microseconds (autocast checks) per call; its
    tensor is `_value`, which the update changes in place."""
    tensor = getattr(variable, "_value", None)
    return variable.value if tensor is None else tensor


def _flat(values, dtype=None):
    """The values raveled (and cast to `dtype`) into one flat array."""
    import jax.numpy as jnp

    return jnp.concatenate(
        [jnp.ravel(x).astype(dtype or x.dtype) for x in values]
    )


def _tf_flat(values, dtype):
    """The values raveled (and cast to `dtype`) into one flat tensor."""
    import tensorflow as tf

    return tf.concat(
        [tf.reshape(tf.cast(x, dtype), [-1]) for x in values], axis=0
    )


def _packed(values):
    """The values raveled into one new flat array (JAX, one compiled call),
    as the one-element list the update takes."""
    return _jax_jitted(_pack)(list(values))


def _pack(values):
    return [_flat(values)]


def _unpacked(packed, shapes):
    """Inverse of `_packed`: new arrays of the given shapes."""
    return _jax_jitted(_unpack, static_argnums=1)(packed, tuple(shapes))


def _unpack(packed, shapes):
    flat, pieces, offset = packed[0], [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        pieces.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return pieces


def fusable(model):
    """Whether `Updater.attach` can put the update into `model`'s compiled
    train step: TensorFlow, or JAX with `jit_compile` (not NNX), without a
    distribution (`tf.distribute`, `keras.distribution`) or `run_eagerly`."""
    if model.run_eagerly:
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        try:
            nnx = keras.config.is_nnx_enabled()
        except AttributeError:
            nnx = False
        return (bool(model.jit_compile) and not nnx
                and keras.distribution.distribution() is None)
    if backend == "tensorflow":
        import tensorflow as tf

        return (
            not tf.distribute.has_strategy()
            and getattr(model, "_distribute_strategy", None) is None
            and hasattr(model, "_make_function")
        )
    return False


def step_counter(optimizer):
    """``(variable, k)``: the variable counting `optimizer`'s calls, and
    the gradient-accumulation period ``k`` (the weights change at calls
    that leave the count a multiple of ``k``).

    With ``gradient_accumulation_steps`` Keras's ``iterations`` is a
    tensor (``_iterations // k``) made anew at each read; the variable
    behind it is ``_iterations`` of the optimizer that accumulates (a
    `LossScaleOptimizer`'s inner one)."""
    owner = optimizer
    while (not getattr(owner, "gradient_accumulation_steps", None)
           and getattr(owner, "inner_optimizer", None) is not None
           and not isinstance(owner.iterations, keras.Variable)):
        owner = owner.inner_optimizer
    accumulation = int(getattr(owner, "gradient_accumulation_steps", None)
                       or 1)
    counter = owner.iterations
    if not isinstance(counter, keras.Variable):
        counter = getattr(owner, "_iterations", None)
    if not isinstance(counter, keras.Variable):
        raise ValueError(
            "EMA cannot find the step counter of the optimizer "
            f"{type(optimizer).__name__} (its `iterations` is not a "
            "variable)."
        )
    return counter, accumulation


def _restart(weights, iteration, count, packed):
    """s_0 = w_0 (packed or one copy per weight), count 0, last step."""
    import jax.numpy as jnp

    shadows = _pack(weights) if packed else _copy_all(weights)
    return shadows, jnp.zeros_like(count), jnp.copy(iteration)


def _ema_math(shadows, weights, count, last, iteration, config):
    """One EMA step, skipped in-graph when no optimizer step happened.

    ``iteration`` is the optimizer's step counter now, ``last`` its value at
    the previous update. An update happens when it moved (and, with gradient
    accumulation over ``k`` batches, when it is a multiple of ``k``: the
    weights change only then). Returns new shadows, count and last.
    """
    d, count, last = _ema_decay(count, last, iteration, config)
    new = []
    for shadow, weight in zip(shadows, weights):
        ds = keras.ops.cast(d, shadow.dtype)
        new.append(ds * shadow
                   + (1.0 - ds) * keras.ops.cast(weight, shadow.dtype))
    return new, count, last


def _ema_decay(count, last, iteration, config):
    """``(d, count, last)`` of `_ema_math`: the decay of this update (1
    where no optimizer step happened), the new step count and last step."""
    decay, warmup, power, accumulation = config
    ops = keras.ops
    changed = ops.not_equal(iteration, last)
    if accumulation > 1:
        changed = ops.logical_and(
            changed, ops.equal(ops.mod(iteration, accumulation), 0)
        )
    count = count + ops.cast(changed, count.dtype)
    d = ops.convert_to_tensor(decay, "float32")
    if warmup:
        t = ops.maximum(ops.cast(count, "float32"), 1.0)
        d = ops.minimum(d, 1.0 - ops.power(t, -power))
    d = ops.where(changed, d, ops.ones_like(d))
    return d, count, iteration


class Updater:
    """Runs the EMA update, fused into the train step where it can.

    Fused (`attach`; TensorFlow and JAX with a compiled train step, no
    distribution): the model's train function takes the optimizer step and
    the EMA step in one compiled program; calling the updater
    (``on_train_batch_begin``) arms the next step.

    Otherwise one compiled call per step: called before every train step
    and before the averaged weights are read (validation, swaps, state, end
    of training), it folds in the optimizer step just taken, if any. Doing
    it at the start of the next step instead of in ``on_train_batch_end``
    keeps Keras's asynchronous callback dispatch (a batch-end hook forces
    every step's logs to the host and serializes the loop).
    """

    def __init__(self, model, targets, shadows, count, last, config,
                 iterations):
        self.model = model
        self.targets = targets
        self.shadows = shadows
        self.count = count
        self.last = last
        self.config = config
        self.iterations = iterations  # the variable of `step_counter`
        self.backend = keras.backend.backend()
        # Bulk reads and writes (`restart`; the EMA's swaps).
        self.target_group = BulkVariables(targets)
        self.shadow_group = BulkVariables(shadows)
        self._fused = None  # (model, original, wrapper) while fused
        self._fused_cache = None  # (original train function, fused one)
        self._armed = False
        if self.backend == "tensorflow":
            import tensorflow as tf

            self._tf_packed = self._tf_packed_shadow()
            self._tf_packed_stale = True  # packed from `shadows` when due

            def update():
                packed = self._tf_packed
                if packed is None:
                    current = [s.value for s in shadows]
                    weights = [t.value for t in targets]
                    unpacked = list(range(len(shadows)))
                else:
                    unpacked = self._tf_unpacked_indices
                    current = [packed.value] + [
                        shadows[i].value for i in unpacked
                    ]
                    weights = [_tf_flat(
                        [t.value for t in self._tf_small(targets)],
                        packed.dtype,
                    )] + [targets[i].value for i in unpacked]
                d, count, last = _ema_decay(
                    self.count.value, self.last.value,
                    self.iterations.value, config,
                )
                variables = [shadows[i] for i in unpacked]
                if packed is not None:
                    variables = [packed] + variables
                # s <- s - (1 - d) * (s - w): two temporaries and an
                # in-place subtraction per weight (d * s + (1 - d) * w
                # takes three temporaries; without XLA each is a pass over
                # memory: 4.6 instead of 5.5 ms for 5.8M weights).
                for variable, shadow, weight in zip(variables, current,
                                                    weights):
                    step = tf.cast(1.0 - d, shadow.dtype)
                    variable.assign_sub(
                        step * (shadow - tf.cast(weight, shadow.dtype))
                    )
                self.count.assign(count)
                self.last.assign(last)

            # XLA fuses the update into one pass over each weight (about 4x
            # faster on CPU than the unfused graph); without XLA (or where
            # it cannot compile, e.g. some distributed variables) the plain
            # graph is used.
            self._tf_update_body = update
            self._tf_plain = tf.function(update, autograph=False)
            self._tf_xla = tf.function(update, autograph=False,
                                       jit_compile=True)
            self._xla_errors = (tf.errors.OpError, NotImplementedError,
                                ValueError)
            self.update = self._tf_first_update
        elif self.backend == "jax":
            import jax

            self._packed = self._jax_pack_shadows()
            self._jitted = jax.jit(self._jax_math, donate_argnums=0)
            self._arrays = None
            self._index = self._state_index()
            self.update = self._jax_update
        elif self.backend == "torch":
            self._host = None  # (count, last) between flushes, on CPU
            if self._torch_counter_on_host():
                self.update = self._torch_update
            else:
                self.update = self._torch_update_on_device
            self._torch_variables = (
                list(self.shadows) + list(self.targets)
                + [self.iterations, self.last, self.count]
            )
            self._torch_graphs = (
                self.update == self._torch_update_on_device
                and self._torch_cuda_graphs_available()
            )
            self._torch_graph = None  # (tensor addresses, CUDAGraph)
        else:
            self.update = self._eager_update

    # TensorFlow ---------------------------------------------------------
    # Variables of at most this many values go into the packed shadow.
    _TF_PACK_LIMIT = 65536

    def _tf_packed_shadow(self):
        """One flat variable holding the small shadows between flushes, or
        None.

        Each variable the update reads and writes costs TensorFlow's graph
        executor a few microseconds beyond its arithmetic: one flat
        shadow, updated from the small weights concatenated, takes the
        update of a 24-layer MLP with batch normalization (98 weights,
        0.49M values) from ~1.0 to ~0.7 ms per step on 2 CPU cores. Large
        weights (more than `_TF_PACK_LIMIT` values) stay apart: for them
        the concatenation's extra pass over memory costs more than it
        saves (two 2048x2048 kernels: 4.5 ms unpacked, 8-11 ms packed).
        Needs one dtype and no distribution (a concatenation of mirrored
        or sharded weights would gather them); `flush` writes it into the
        shadow variables.
        """
        small = [i for i, s in enumerate(self.shadows)
                 if int(np.prod(s.shape)) <= self._TF_PACK_LIMIT]
        dtypes = {str(s.dtype) for s in self.shadows}
        if (len(small) < 2 or len(dtypes) != 1
                or not self.shadow_group.compiled):
            return None
        self._tf_small_indices = small
        self._tf_unpacked_indices = sorted(
            set(range(len(self.shadows))) - set(small))
        size = sum(int(np.prod(self.shadows[i].shape)) for i in small)
        return keras.Variable(
            np.zeros((size,), dtypes.pop()), trainable=False,
            name="ema_packed_shadow",
        )

    def _tf_small(self, variables):
        return [variables[i] for i in self._tf_small_indices]

    def _tf_pack(self):
        """The small shadow variables into the packed one (after they were
        written: `restart`, `shadows_assigned`)."""
        if self._tf_packed is None or not self._tf_packed_stale:
            return
        if not hasattr(self, "_tf_pack_function"):
            import tensorflow as tf

            def pack():
                self._tf_packed.assign(_tf_flat(
                    [s.value for s in self._tf_small(self.shadows)],
                    self._tf_packed.dtype,
                ))

            def unpack():
                flat, offset = self._tf_packed.value, 0
                for shadow in self._tf_small(self.shadows):
                    size = int(np.prod(shadow.shape))
                    shadow.assign(tf.reshape(flat[offset:offset + size],
                                             shadow.shape))
                    offset += size

            self._tf_pack_function = tf.function(pack, autograph=False)
            self._tf_unpack_function = tf.function(unpack, autograph=False)
        self._tf_pack_function()
        self._tf_packed_stale = False

    def _tf_unpack(self):
        if self._tf_packed is not None and not self._tf_packed_stale:
            self._tf_unpack_function()

    def shadows_assigned(self):
        """The shadow variables were written (`restart`, `set_state`): the
        next update starts from them."""
        if self.backend == "tensorflow":
            self._tf_packed_stale = True
        elif self.backend == "jax":
            self._arrays = None

    def _tf_first_update(self):
        try:
            self._tf_xla()
            self.update = self._tf_xla
        except self._xla_errors:  # XLA unavailable or unable to compile.
            self.update = self._tf_plain
            self.update()

    # JAX ----------------------------------------------------------------
    def _state_index(self):
        model = self.model
        places = {}
        for key, variables in (
            ("trainable_variables", model.trainable_variables),
            ("non_trainable_variables", model.non_trainable_variables),
            ("optimizer_variables", model.optimizer.variables),
        ):
            for i, v in enumerate(variables):
                places.setdefault(id(v), (key, i))
        return (
            [places[id(t)] for t in self.targets],
            places.get(id(self.iterations)),
        )

    def _jax_current(self):
        # During fit the JAX trainer holds the newest state in `_jax_state`
        # and writes it into the variables only at the end of an epoch
        # (`jax_state_sync`, which costs a full write per call). Read it
        # there when the variables are stale.
        model = self.model
        state = getattr(model, "_jax_state", None)
        targets_index, iterations_index = self._index
        if (
            state and not getattr(model, "_jax_state_synced", True)
            and iterations_index is not None
        ):
            try:
                weights = [state[key][i] for key, i in targets_index]
                key, i = iterations_index
                return weights, state[key][i]
            except (KeyError, IndexError, TypeError):
                pass
        model.jax_state_sync()
        return [t.value for t in self.targets], self.iterations.value

    def _jax_pack_shadows(self):
        """Whether the shadow is kept in one flat buffer between flushes.

        Each array passed in and out of a jitted step costs host time per
        call; on a GPU, where a small model's step is bound by that host
        time, one buffer for all shadows instead of one per weight saves
        ~15 us per step (H100, the benchmark MLP). Not on the CPU: there
        XLA's concatenation is several times slower than the per-weight
        update. Needs one dtype for all shadows, and no distribution (a
        concatenation of sharded weights would gather them).
        """
        import jax

        dtypes = {str(s.dtype) for s in self.shadows}
        return (
            jax.default_backend() != "cpu" and len(self.shadows) > 1
            and len(dtypes) == 1
            and keras.distribution.distribution() is None
        )

    def _jax_math(self, shadows, weights, count, last, iteration):
        if self._packed:
            weights = [_flat(weights, shadows[0].dtype)]
        return _ema_math(shadows, weights, count, last, iteration,
                         self.config)

    def _jax_update(self):
        weights, iteration = self._jax_current()
        if self._arrays is None:
            self._arrays = self._jax_arrays()
        shadows, count, last = self._arrays
        self._arrays = self._jitted(shadows, weights, count, last, iteration)

    def _jax_arrays(self):
        # Copies: the jitted update donates (reuses) its input buffers.
        values = [s.value for s in self.shadows]
        shadows = _packed(values) if self._packed else copies(values)
        count, last = self.count.value, self.last.value
        return shadows, copy_value(count), copy_value(last)

    def _jax_shadow_values(self, shadows):
        """The shadows of `_arrays`, one array per shadow variable."""
        if not self._packed:
            return shadows
        return _unpacked(shadows, [tuple(s.shape) for s in self.shadows])

    # Fused into the train step -------------------------------------------
    def attach(self):
        """Fuses the update into the model's compiled train step.

        One compiled program then takes the optimizer step and the EMA step:
        no second dispatch per batch, and XLA fuses the shadow update into
        the optimizer's pass over the weights. The model's `train_function`
        is replaced for this `fit` only (`detach` restores it); a step the
        EMA did not arm (`on_train_batch_begin`), or one in another fit
        (another `model.history`), runs the original function, so an
        interrupted fit leaves no EMA in later fits. Under a distribution
        (`tf.distribute`, `keras.distribution`), with JAX's `jit_compile=False`
        or NNX, and on PyTorch, the separate call per step is kept (on
        PyTorch with CUDA, replayed from a CUDA graph captured here).
        """
        if self.backend == "torch":
            self._torch_capture()
        model = self.model
        original = model.train_function
        if (
            original is None or model.run_eagerly
            or getattr(model, "history", None) is None
        ):
            return
        if self.backend == "jax":
            fused = self._jax_fused_function(original)
        elif self.backend == "tensorflow":
            fused = self._tf_fused_function(original)
        else:
            fused = None
        if fused is None:
            return
        # This fit's History: a later fit (after an interrupted one that
        # left this wrapper in place) has another.
        fit_token = model.history

        def train_function(*args):
            if not self._armed or model.history is not fit_token:
                return original(*args)
            self._armed = False
            return fused(*args)

        model.train_function = train_function
        self._fused = (model, original, train_function)

    @property
    def fused(self):
        """Whether the update runs inside the model's train step (after
        `attach`, during a fit)."""
        return self._fused is not None

    def detach(self):
        """Gives the model its own train function back."""
        if self._fused is None:
            return
        model, original, wrapper = self._fused
        if model.train_function is wrapper:
            model.train_function = original
        self._fused = None
        self._armed = False

    def _cached(self, original, build):
        # Compiled once per train function (a new `compile` makes a new
        # one), not once per fit.
        cache = self._fused_cache
        if cache is None or cache[0] is not original:
            cache = self._fused_cache = (original, build())
        return cache[1]

    def _jax_fused_function(self, original):
        model = self.model
        targets_index, iterations_index = self._index
        if (
            not fusable(model) or iterations_index is None
            or iterations_index[0] != "optimizer_variables"
        ):
            return None
        import jax

        def step(state, arrays, data):
            logs, state = model.train_step(state, data)
            groups = {
                "trainable_variables": state[0],
                "non_trainable_variables": state[1],
                "optimizer_variables": state[2],
            }
            weights = [groups[key][i] for key, i in targets_index]
            iteration = state[2][iterations_index[1]]
            shadows, count, last = arrays
            return logs, state, self._jax_math(
                shadows, weights, count, last, iteration
            )

        jitted = self._cached(
            original, lambda: jax.jit(step, donate_argnums=(0, 1))
        )

        def fused(state, iterator):
            # As Keras's JAX loop: `steps_per_execution` steps per call
            # (fewer at the end of the data), the EMA after each.
            if self._arrays is None:
                self._arrays = self._jax_arrays()
            logs, state, self._arrays = jitted(
                state, self._arrays, next(iterator)
            )
            for _ in range(model.steps_per_execution - 1):
                try:
                    data = next(iterator)
                except StopIteration:
                    break
                logs, state, self._arrays = jitted(state, self._arrays, data)
            return logs, state

        return fused

    def _tf_fused_function(self, original):
        model = self.model
        if not fusable(model):
            return None
        train_step = model.train_step
        update = self._tf_update_body

        def step(data):
            logs = train_step(data)
            update()  # after the optimizer step (variable reads are ordered)
            return logs

        # Keras builds the same function around the new step (XLA when
        # `jit_compile`): the EMA is part of the compiled train step.
        return self._cached(original, lambda: model._make_function(step))

    # PyTorch ------------------------------------------------------------
    def _torch_update(self):
        """The update with the step counter on the host (PyTorch on CPU):
        one multi-tensor lerp per step. The step count and the last step
        seen live in Python ints between flushes (two variable assignments
        per step cost as much as the lerp of a small model)."""
        import torch

        decay, warmup, power, accumulation = self.config
        iteration = int(_torch_tensor(self.iterations))
        if self._host is None:
            self._host = (int(self.count.value), int(self.last.value))
        count, last = self._host
        if iteration == last or iteration % accumulation:
            return
        count += 1
        d = min(decay, 1.0 - count ** (-power)) if warmup else decay
        with torch.no_grad():
            # s <- s + (1 - d) * (w - s), fused and in place.
            torch._foreach_lerp_(
                [_torch_tensor(s) for s in self.shadows],
                [_torch_tensor(t) for t in self.targets],
                1.0 - d,
            )
        self._host = (count, iteration)

    def _torch_counter_on_host(self):
        return self.iterations.value.device.type == "cpu"

    def _torch_cuda_graphs_available(self):
        device = self.iterations.value.device
        return device.type == "cuda" and all(
            t.value.device == device for t in self.targets + self.shadows
        )

    def _torch_update_on_device(self):
        """The update without reading the step counter on the host.

        On an accelerator `int(counter)` would wait for the step to finish
        (twice per step), stalling Keras's asynchronous loop: the decision
        "did the optimizer step?" becomes a weight of 0 instead of a branch.
        On CUDA the ~8 kernels are replayed from a CUDA graph captured when
        the fit begins (`attach`): one launch per step (the launches, not
        the arithmetic, are what an EMA costs there). The graph holds the
        tensors' addresses: if one moved, the kernels run uncaptured. It
        also keeps its own scratch buffers (one copy of the averaged
        weights) for as long as the EMA keeps this model.
        """
        if self._torch_graph is not None:
            addresses, graph = self._torch_graph
            if self._torch_addresses() == addresses:
                graph.replay()
                return
            self._torch_graph = None
        self._torch_device_step(*self._torch_tensors())

    def _torch_tensors(self):
        return (
            [_torch_tensor(s) for s in self.shadows],
            [_torch_tensor(t) for t in self.targets],
            _torch_tensor(self.iterations), _torch_tensor(self.last),
            _torch_tensor(self.count),
        )

    def _torch_addresses(self):
        return tuple(
            _torch_tensor(v).data_ptr() for v in self._torch_variables
        )

    def _torch_capture(self):
        """Captures the update into a CUDA graph (once per fit at most)."""
        if not self._torch_graphs:
            return
        addresses = self._torch_addresses()
        if self._torch_graph is not None and (
            self._torch_graph[0] == addresses
        ):
            return
        tensors = self._torch_tensors()
        # A run before capturing initializes what the kernels need; at the
        # start of a fit no optimizer step is pending, so it changes nothing.
        self._torch_device_step(*tensors)
        try:
            graph = self._torch_record(
                lambda: self._torch_device_step(*tensors)
            )
        except RuntimeError:  # capture unsupported here: stay uncaptured
            self._torch_graphs = False
            self._torch_graph = None
            return
        self._torch_graph = (addresses, graph)

    @staticmethod
    def _torch_record(step):
        """A CUDA graph of `step`'s kernels (recorded, not run)."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        return graph

    def _torch_device_step(self, shadows, targets, iteration, last, count):
        import torch

        decay, warmup, power, accumulation = self.config
        with torch.no_grad():
            changed = torch.ne(iteration, last)
            if accumulation > 1:
                changed = changed & torch.eq(iteration % accumulation, 0)
            count.add_(changed.to(count.dtype))
            if warmup:
                t = count.to(torch.float32).clamp(min=1.0)
                one_minus_d = torch.clamp(t.pow(-power), min=1.0 - decay)
                weight = one_minus_d * changed
            else:
                weight = changed * (1.0 - decay)
            # s <- s + (1 - d) * (w - s), in three multi-tensor kernels.
            steps = torch._foreach_sub(targets, shadows)
            torch._foreach_mul_(steps, weight)
            torch._foreach_add_(shadows, steps)
            last.copy_(iteration)

    def _eager_update(self):
        new, count, last = _ema_math(
            [s.value for s in self.shadows], [t.value for t in self.targets],
            self.count.value, self.last.value, self.iterations.value,
            self.config,
        )
        for shadow, value in zip(self.shadows, new):
            shadow.assign(value)
        self.count.assign(count)
        self.last.assign(last)

    def __call__(self):
        if self.backend == "tensorflow":
            self._tf_pack()
        if self._fused is not None:
            # The train step itself updates the shadow; let it, once.
            self._armed = True
        else:
            self.update()

    def restart(self):
        """Sets s_0 = w_0, the step count to 0 and the last step seen to
        the optimizer's. On JAX one compiled call gives the update's arrays
        (the variables get them at the next `flush`) instead of a copy and
        an assignment per weight and two small transfers."""
        if self.backend != "jax":
            self._host = None
            self.shadow_group.assign_from(self.target_group)
            self.shadows_assigned()
            self.count.assign(0)
            self.last.assign(copy_value(self.iterations.value))
            return
        self._arrays = _jax_jitted(_restart, static_argnums=3)(
            [t.value for t in self.targets], self.iterations.value,
            self.count.value, self._packed,
        )

    def flush(self, fold_in=True):
        """Brings pending updates into the shadow variables; with
        `fold_in`, the optimizer step taken since the last update too."""
        if self.backend == "tensorflow":
            self._tf_pack()
        if self._fused is None and fold_in:
            self.update()
        if self.backend == "tensorflow":
            self._tf_unpack()
        if self.backend == "jax" and self._arrays is not None:
            shadows, count, last = self._arrays
            shadows = self._jax_shadow_values(shadows)
            for shadow, value in zip(self.shadows, shadows):
                shadow.assign(value)
            self.count.assign(count)
            self.last.assign(last)
            self._arrays = None
        if self.backend == "torch" and self._host is not None:
            count, last = self._host
            self.count.assign(count)
            self.last.assign(last)
            self._host = None
