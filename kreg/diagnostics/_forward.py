"""Runs a model on values and records every leaf layer's input and output.

Shared by `kreg.diagnose` and `kreg.initializers.lsuv`. A Sequential model
is run layer by layer; a Functional model through a feature-extractor
model over its own graph (its layers' symbolic outputs); a model nested in
either is run the same way on its own input. Layers of a subclassed model
(no graph to read) are not recorded: the model is called as a whole.
"""

import keras

from kreg import _keras_private


def graph_model(layer):
    """Whether `layer` is a built Sequential or Functional model."""
    if not isinstance(layer, keras.Model):
        return False
    try:
        return bool(layer.inputs) and bool(layer.outputs)
    except (AttributeError, ValueError):
        return False


def _flat(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _single(tensors):
    return tensors[0] if len(tensors) == 1 else tensors


def _connects(model, tensors):
    try:
        keras.Model(model.inputs, tensors)
        return True
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


class Recorder:
    """Plans the taps of a model once; `run` then records values.

    `records` (after `run`): ``{id(layer): (layer, input, output)}`` for
    every recorded leaf layer, `input` None for a layer with several
    inputs.
    """

    def __init__(self, model):
        self.model = model
        self._plans = {}
        self.records = {}

    def run(self, inputs, training):
        """The model's outputs on `inputs` (values), recording the layers."""
        self.records = {}
        return self._run(self.model, inputs, training)

    def _run(self, model, inputs, training):
        if not graph_model(model):
            return model(inputs, training=training)
        if isinstance(model, keras.Sequential):
            x = inputs
            for layer in model.layers:
                x = self._call(layer, x, training)
            return x
        return self._run_functional(model, inputs, training)

    def _call(self, layer, x, training):
        if graph_model(layer):
            return self._run(layer, x, training)
        y = layer(x, training=training)
        if not isinstance(layer, keras.layers.InputLayer):
            self.records[id(layer)] = (layer, x, y)
        return y

    def _plan(self, model):
        """(extractor, outputs, taps): `outputs` are the indices of the
        model's outputs among the extractor's; taps are ``(layer, ins,
        outs)`` with index lists, `outs` None for a nested model."""
        if id(model) in self._plans:
            return self._plans[id(model)]
        candidates = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if graph_model(layer):
                for ins in _keras_private.call_input_tensors(layer):
                    if ins:
                        candidates.append((layer, ins, None))
                        break
                continue
            try:
                candidates.append(
                    (layer, _flat(layer.input), _flat(layer.output)))
            except (AttributeError, ValueError):
                continue
        every = [t for _, ins, outs in candidates for t in ins + (outs or [])]
        if not _connects(model, every):
            # Some layer's first call belongs to another graph (a shared
            # layer, a nested model used elsewhere first): leave it out.
            candidates = [c for c in candidates
                          if _connects(model, c[1] + (c[2] or []))]
        tensors, index = [], {}

        def positions(group):
            for tensor in group:
                if id(tensor) not in index:
                    index[id(tensor)] = len(tensors)
                    tensors.append(tensor)
            return [index[id(tensor)] for tensor in group]

        outputs = positions(list(model.outputs))
        taps = [(layer, positions(ins),
                 None if outs is None else positions(outs))
                for layer, ins, outs in candidates]
        plan = (keras.Model(model.input, tensors), outputs, taps)
        self._plans[id(model)] = plan
        return plan

    def _run_functional(self, model, inputs, training):
        extractor, outputs, taps = self._plan(model)
        values = _flat(extractor(inputs, training=training))
        for layer, ins, outs in taps:
            ins = [values[i] for i in ins]
            if outs is None:
                self._run(layer, _single(ins), training)
                continue
            self.records[id(layer)] = (
                layer, ins[0] if len(ins) == 1 else None,
                _single([values[i] for i in outs]))
        return _single([values[i] for i in outputs])
