"""An ensemble's members run as one vectorized call (PyTorch)."""

import types

import keras


class StackedMembers:
    """Runs alike members as one vectorized call of the first member.

    On PyTorch, calling ``k`` members one by one costs ``k`` times Keras's
    per-layer Python overhead. Where the members are alike, ``torch.vmap``
    runs the first member once, in a `keras.StatelessScope` that maps its
    variables to every member's values stacked along a new leading axis:
    gradients flow through the stack into each member's own variables, the
    variables the call updates (BatchNormalization statistics) are assigned
    back to each member, and the losses the call adds (activity
    regularization) are summed over the members.

    Alike means of the same class, with layers of the same classes and
    public settings (``units``, ``activation``, ``momentum``, ...) and
    variables of the same shapes and dtypes, and checked in use: the first
    call in each mode (training or inference) runs the members one by one
    and also vectorized, and the vectorized call is kept for that mode only
    where it gives the same outputs, variable updates and losses.

    Calling returns ``(outputs, losses)``, the list of the members' outputs
    and the losses to add, or `None` where the caller must call the members
    one by one: `enabled=False`, other backends (which compile the loop),
    one member, mixed precision (where `dtype`, the caller's compute dtype,
    is not that of the members' floating-point variables, which Keras
    would cast on reading them), symbolic or `torch.compile`-d calls, and
    members that differ or fail under ``vmap``, such as those that draw
    random numbers (dropout, noise).
    """

    def __init__(self, members, dtype, enabled=True):
        self.members = members
        self.dtype = dtype
        self.usable = {}
        self.variables = None
        if (not enabled or keras.backend.backend() != "torch"
                or len(members) < 2):
            self.usable = {True: False, False: False}

    def __call__(self, inputs, training):
        training = bool(training)
        if self.usable.get(training) is False or not _is_eager(inputs):
            return None
        if self.variables is None:
            self.variables = _alike_variables(self.members, self.dtype)
            if self.variables is None:
                self.usable = {True: False, False: False}
                return None
        if training not in self.usable:
            return self.checked_call(inputs, training)
        outputs, updates, losses = self.vectorized_call(inputs, training)
        for i, values in updates.items():
            for variables, value in zip(self.variables, values.unbind()):
                variables[i].assign(value)
        return outputs, [loss.sum() for loss in losses]

    def checked_call(self, inputs, training):
        """Calls the members one by one; keeps the vectorized call for this
        mode where it gives the same results."""
        try:
            outputs, updates, losses = self.vectorized_call(inputs, training)
        except Exception:  # Any failure under vmap: one by one.
            self.usable[training] = False
            return None
        before = [[v.value.clone() for v in own] for own in self.variables]
        expected = [member(inputs, training=training)
                    for member in self.members]
        self.usable[training] = (
            all(_close(a, b) for a, b in zip(
                keras.tree.flatten(outputs), keras.tree.flatten(expected)))
            and all(_close(updates[i][m] if i in updates else value,
                           own[i].value)
                    for m, own in enumerate(self.variables)
                    for i, value in enumerate(before[m]))
            and _close(sum(loss.sum() for loss in losses),
                       sum(_activity_loss(member) for member in self.members)))
        return expected, []

    def vectorized_call(self, inputs, training):
        """The members' outputs, the new values of the variables the call
        updates (by index, stacked) and the losses it adds (stacked)."""
        import torch

        first = self.members[0]
        first_variables = self.variables[0]
        stacked = [torch.stack([variables[i].value
                                for variables in self.variables])
                   for i in range(len(first_variables))]
        updated = []

        def one_member(values):
            mapping = list(zip(first_variables, values))
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True) as scope:
                outputs = first(inputs, training=training)
            new_values = [scope.get_current_value(v) for v in first_variables]
            updated[:] = [i for i, (new, old) in enumerate(
                zip(new_values, values)) if new is not old]
            return (outputs, [new_values[i] for i in updated],
                    list(scope.losses))

        outputs, new_values, losses = torch.func.vmap(
            one_member, randomness="error")(stacked)
        leaves = [leaf.unbind() for leaf in keras.tree.flatten(outputs)]
        member_outputs = [
            keras.tree.pack_sequence_as(outputs, [leaf[m] for leaf in leaves])
            for m in range(len(self.members))]
        return member_outputs, dict(zip(updated, new_values)), losses


def _is_eager(inputs):
    """Whether `inputs` hold real tensors outside `torch.compile`."""
    import torch

    if torch.compiler.is_compiling():
        return False
    return all(isinstance(x, torch.Tensor) and x.device.type != "meta"
               for x in keras.tree.flatten(inputs))


def _alike_variables(members, dtype):
    """Every member's variables, in one order, or `None` where the members
    are not of one class and layer settings, their variables differ in shape
    or dtype or are not their own, or a floating-point one is not of
    `dtype`."""
    variables = [member.trainable_variables + member.non_trainable_variables
                 for member in members]
    signature = _signature(members[0], variables[0])
    if any(_signature(member, own) != signature
           for member, own in zip(members[1:], variables[1:])):
        return None
    if len({id(v) for own in variables for v in own}) != sum(
            len(own) for own in variables):
        return None
    if any("float" in v.dtype and v.dtype != dtype for v in variables[0]):
        return None
    return variables


def _signature(model, variables):
    return (type(model), [_settings(layer) for layer in model.layers],
            [(tuple(v.shape), v.dtype) for v in variables])


def _settings(layer):
    """A layer's class and its public settings (numbers, strings, tuples of
    them, functions such as its activation), without `get_config`, which
    imports TensorFlow where it is installed."""
    settings = {"class": type(layer)}
    for key, value in vars(layer).items():
        if key.startswith("_") or key == "name":
            continue
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple) and all(
                isinstance(item, _SCALARS) for item in value):
            settings[key] = value
        elif isinstance(value, _SCALARS) or (
                isinstance(value, types.FunctionType)
                and value.__closure__ is None):  # not a per-layer wrapper
            settings[key] = value
    return settings


_SCALARS = (bool, int, float, str, type(None))


def _activity_loss(member):
    """The losses `member`'s last call added (its losses but the weight
    regularization)."""
    weight_losses = [v.regularizer(v) for v in member.trainable_variables
                     if v.regularizer is not None]
    return sum(member.losses) - sum(weight_losses)


def _close(actual, expected):
    import torch

    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32),
                          rtol=1e-4, atol=1e-6)
