"""A pass over a model with its state mapped, on every backend.

`run(fn, model, args, grad, key)` calls ``fn(*args) -> (loss, aux)``
inside a `keras.StatelessScope` that maps each of the model's variables
to a copy of its value, so nothing the function assigns (batch
normalization statistics, random seed states) reaches the model. With
``grad=True`` it also returns the gradients of `loss` with respect to
``model.trainable_variables`` (zero where the loss does not depend on
one): ``(loss, aux, grads)``.

On JAX (always) and TensorFlow (from the second call for a model on) the
pass is compiled (`jax.jit`, `tf.function`: op by op it costs several
train steps) and kept per model, `key` (the
shapes of the arguments) and trainable variables (the last four),
beside the `holder` list that the first trace filled (a later call does
not trace).
"""

import collections

import keras

# The last few compiled passes: (model, key) -> (function, holder).
_CACHE = collections.OrderedDict()
_CACHE_SIZE = 4


def _values(variables):
    return [keras.ops.convert_to_tensor(v.value) for v in variables]


def run(fn, model, args, grad, key, holder):
    trainable = list(model.trainable_variables)
    ids = {id(v) for v in trainable}
    others = [v for v in model.variables if id(v) not in ids]

    def scoped(trainable_values, other_values, args):
        mapping = list(zip(trainable, trainable_values))
        mapping += list(zip(others, other_values))
        with keras.StatelessScope(state_mapping=mapping):
            return fn(*args)

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax", "torch"):
        raise NotImplementedError(
            "kreg.diagnose runs on the tensorflow, jax and torch backends. "
            f"Received: backend={backend!r}")
    t_values, o_values = _values(trainable), _values(others)
    if backend == "torch":
        return _torch_pass(scoped, t_values, o_values, args, grad)
    key = (id(model), key, tuple(id(v) for v in trainable), len(others))
    entry = _CACHE.get(key)
    if backend == "tensorflow" and (entry is None or entry[0] is not model):
        # First call: eagerly (tracing costs more than one pass); compiled
        # from the second call on.
        _CACHE[key] = (model, None, None)
        return _tensorflow_eager(scoped, t_values, o_values, args, grad)
    if entry is None or entry[0] is not model or entry[1] is None:
        entry = (model, _compile(scoped, grad, backend), holder)
        _CACHE[key] = entry
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    _, function, first_holder = entry
    loss, aux, grads = function(t_values, o_values, args)
    if holder is not first_holder:
        holder[:] = first_holder
    return loss, aux, grads


def _compile(scoped, grad, backend):
    if backend == "jax":
        import jax

        if not grad:
            return jax.jit(lambda *a: (*scoped(*a), None))
        gradient = jax.value_and_grad(scoped, has_aux=True)

        def jax_pass(*a):
            (loss, aux), grads = gradient(*a)
            return loss, aux, grads
        return jax.jit(jax_pass)
    import tensorflow as tf

    return tf.function(
        lambda *a: _tensorflow_eager(scoped, *a, grad))


def _tensorflow_eager(scoped, t_values, o_values, args, grad):
    import tensorflow as tf

    if not grad:
        return (*scoped(t_values, o_values, args), None)
    with tf.GradientTape() as tape:
        tape.watch(t_values)
        loss, aux = scoped(t_values, o_values, args)
    grads = tape.gradient(loss, t_values)
    return loss, aux, [tf.zeros_like(v) if g is None else g
                       for v, g in zip(t_values, grads)]


def _torch_pass(scoped, t_values, o_values, args, grad):
    import torch

    if not grad:
        with torch.no_grad():
            loss, aux = scoped(t_values, o_values, args)
        return loss, aux, None
    t_values = [v.detach().requires_grad_(True) for v in t_values]
    loss, aux = scoped(t_values, o_values, args)
    grads = torch.autograd.grad(loss, t_values, allow_unused=True)
    aux = [a.detach() if hasattr(a, "detach") else a for a in aux]
    grads = [torch.zeros_like(v) if g is None else g
             for v, g in zip(t_values, grads)]
    return loss.detach(), aux, grads
