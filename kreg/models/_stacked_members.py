"""An ensemble's members run as one vectorized call (PyTorch)."""

import keras


class StackedMembers:
    """Runs alike members as one vectorized call of the first member.

    On PyTorch, calling ``k`` members one by one costs ``k`` times Keras's
    per-layer Python overhead. Where the members are alike (same class and
    configuration apart from names, variables of the same shapes and
    dtypes), `keras.ops.vectorized_map` (``torch.vmap``) runs the first
    member once, inside a `keras.StatelessScope` that maps its variables to
    every member's values stacked along a new leading axis; gradients flow
    through the stack into each member's own variables. The variables the
    call updates (BatchNormalization statistics) are assigned back to each
    member, and losses added during the call (activity regularization) are
    returned summed over the members.

    Calling returns ``(outputs, losses)``, the list of the members' outputs
    and the losses, or `None` where the caller must call the members one by
    one: `enabled=False`, other backends (which compile the loop), mixed
    precision (`dtype`, the caller's compute dtype, differs from the
    members' floating-point variables), one
    member, members that differ, symbolic or `torch.compile`-d calls, and
    members that fail under ``vmap``, such as those that draw random
    numbers (dropout, noise): whether they run is tried at the first call
    in each mode (training or inference) and kept.
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
        if training in self.usable:
            return self.call(inputs, training)
        try:
            result = self.call(inputs, training)
        except Exception:  # Any failure: the members run one by one.
            self.usable[training] = False
            return None
        self.usable[training] = True
        return result

    def call(self, inputs, training):
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
        for i, values in zip(updated, new_values):
            for variables, value in zip(self.variables, torch.unbind(values)):
                variables[i].assign(value)
        leaves = [torch.unbind(leaf) for leaf in keras.tree.flatten(outputs)]
        member_outputs = [
            keras.tree.pack_sequence_as(outputs, [leaf[m] for leaf in leaves])
            for m in range(len(self.members))]
        return member_outputs, [torch.sum(loss) for loss in losses]


def _is_eager(inputs):
    """Whether `inputs` hold real tensors outside `torch.compile`."""
    import torch

    if torch.compiler.is_compiling():
        return False
    return all(isinstance(x, torch.Tensor) and x.device.type != "meta"
               for x in keras.tree.flatten(inputs))


def _alike_variables(members, dtype):
    """Every member's variables, in one order, or `None` where the members
    are not alike, their variables are not their own, or a floating-point
    one is not of `dtype` (the ensemble's compute dtype, which Keras would
    cast it to on reading it)."""
    first = members[0]
    config = _config_without_names(first)
    if config is None:
        return None
    variables = [member.trainable_variables + member.non_trainable_variables
                 for member in members]
    signature = [(v.shape, v.dtype) for v in variables[0]]
    for member, own in zip(members[1:], variables[1:]):
        if (type(member) is not type(first)
                or [(v.shape, v.dtype) for v in own] != signature
                or _config_without_names(member) != config):
            return None
    if len({id(v) for own in variables for v in own}) != sum(
            len(own) for own in variables):
        return None
    for variable in variables[0]:
        if "float" in variable.dtype and variable.dtype != dtype:
            return None
    return variables


def _config_without_names(model):
    """`model`'s configuration, each name replaced by its order of first
    appearance, or `None` where the model has none."""
    try:
        config = model.get_config()
    except Exception:  # No configuration: not comparable.
        return None
    names = {}

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                names.setdefault(node["name"], f"<name {len(names)}>")
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    def rename(node):
        if isinstance(node, dict):
            return {key: rename(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [rename(value) for value in node]
        if isinstance(node, str):
            return names.get(node, node)
        return node

    collect(config)
    return rename(config)
