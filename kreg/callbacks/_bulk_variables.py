"""Reads, writes and compares a fixed list of variables at once.

The EMA swaps whole models' weights at every epoch (validation, the end of
training) and restarts its average at each fit. One eager operation per
weight costs ~0.1 ms on TensorFlow: ~80 ms per fit for a 24-layer MLP
with batch normalization (146 weights), 14 % of a 100-step fit. Here each
operation on the whole list is one compiled call.
"""

import keras


def copy_value(value):
    """A copy that owns its buffer (JAX train steps donate their inputs)."""
    return keras.ops.copy(value)


_JAX_JITTED = {}


def _jax_jitted(function, **jit_kwargs):
    """`jax.jit(function)`, made once per process (small helpers are
    traced once per set of shapes, not once per call site)."""
    if function not in _JAX_JITTED:
        import jax

        _JAX_JITTED[function] = jax.jit(function, **jit_kwargs)
    return _JAX_JITTED[function]


def _copy_all(values):
    import jax.numpy as jnp

    return [jnp.copy(x) for x in values]


def copies(values):
    """`copy_value` of each value; on JAX one compiled call for all of them
    (an eager copy per weight is one dispatch each, at every swap)."""
    if keras.backend.backend() != "jax":
        return [copy_value(v) for v in values]
    return _jax_jitted(_copy_all)(list(values))


def _tf_distributed(variables):
    import tensorflow as tf

    return tf.distribute.has_strategy() or any(
        isinstance(getattr(v, "_value", None), tf.distribute.DistributedValues)
        for v in variables
    )


class BulkVariables:
    """A fixed list of variables: `copies()`, `assign(values)`,
    `assign_from(other)`, `exchange(other)`, `equals(other)`.

    TensorFlow: each is one `tf.function` call that captures the variables
    (Keras variables cannot be arguments of a tf.function, and a trace
    that took variables as arguments could be reused for other variables
    of the same shapes). Distributed variables (`tf.distribute`) keep one
    eager operation per variable. JAX: copies and comparisons are one
    jitted call (`assign` only replaces array references). PyTorch: eager
    (an operation costs microseconds there).
    """

    def __init__(self, variables):
        self.variables = list(variables)
        self.backend = keras.backend.backend()
        self._compiled = (
            self.backend == "tensorflow"
            and not _tf_distributed(self.variables)
        )
        self._functions = {}

    @property
    def compiled(self):
        """Whether the operations are compiled calls (TensorFlow, not
        distributed)."""
        return self._compiled

    def values(self):
        """The variables' current values (no copies)."""
        return [v.value for v in self.variables]

    def copies(self):
        """Copies of the current values, each owning its buffer (JAX train
        steps donate their inputs; TensorFlow reads are snapshots)."""
        if self._compiled:
            return self._tf("copies", self._tf_copies)()
        return copies(self.values())

    def assign(self, values):
        """Assigns each value to its variable."""
        values = list(values)
        if len(values) != len(self.variables):
            raise ValueError(
                f"{len(values)} values for {len(self.variables)} variables."
            )
        if self._compiled:
            self._tf("assign", self._tf_assign)(values)
            return
        for variable, value in zip(self.variables, values):
            variable.assign(value)

    def assign_from(self, other):
        """Puts copies of `other`'s values (a `BulkVariables` of the same
        shapes) into these variables."""
        if self._compiled and other._compiled:
            key = ("assign_from", id(other))
            self._tf(key, lambda: self._tf_assign(other.values()))()
            return
        self.assign(other.copies())

    def exchange(self, other):
        """Puts `other`'s values (a `BulkVariables` of the same shapes) into
        these variables; returns copies of the values they held."""
        if self._compiled and other._compiled:
            key = ("exchange", id(other))
            return self._tf(key, lambda: self._tf_exchange(other))()
        previous = self.copies()
        self.assign(other.copies())
        return previous

    def equals(self, other):
        """Whether every variable holds the same value as its partner in
        `other` (a `BulkVariables` of the same shapes); one host read."""
        if self._compiled and other._compiled:
            key = ("equals", id(other))
            equal = self._tf(key, lambda: self._tf_equals(other))()
        elif self.backend == "jax":
            equal = _jax_jitted(_all_equal)(self.values(), other.values())
        else:
            equal = _all_equal(self.values(), other.values())
        return bool(equal)

    # TensorFlow ---------------------------------------------------------
    def _tf(self, key, build):
        if key not in self._functions:
            import tensorflow as tf

            self._functions[key] = tf.function(build, autograph=False)
        return self._functions[key]

    def _tf_copies(self):
        import tensorflow as tf

        return [tf.identity(v.value) for v in self.variables]

    def _tf_assign(self, values):
        for variable, value in zip(self.variables, values):
            variable.assign(value)

    def _tf_exchange(self, other):
        previous = self._tf_copies()
        for variable, value in zip(self.variables, other.values()):
            variable.assign(value)
        return previous

    def _tf_equals(self, other):
        return _all_equal(self.values(), other.values())


def _all_equal(first, second):
    ops = keras.ops
    return ops.all(ops.stack(
        [ops.all(ops.equal(a, b)) for a, b in zip(first, second)]
    ))
