"""Ensemble: k member models trained together in one `fit`."""

import math
import threading
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from kreg.models._member_weights import vary_seeded_initializers
from kreg.models._member_weights import warn_if_identical
from kreg.models._stacked_members import StackedMembers
from kreg.utils.distribute import ReplicaSeedGenerator
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_one_of
from kreg.utils.validation import check_optional_seed
from kreg.utils.warn import warn_user

# The key of the training output (see `Ensemble.call`).
MEMBER_OUTPUTS = "kreg_member_outputs"
BOOTSTRAP_WEIGHTS = "kreg_bootstrap_weights"
# The bootstrap draws' random state in weights files.
_SEED_STATE = "bootstrap_seed_state"

# P(K <= j) for K ~ Poisson(1), j = 0, 1, ..., 11 (P(K > 12) < 1e-10).
_POISSON_CDF = np.cumsum(
    [math.exp(-1.0) / math.factorial(j) for j in range(12)]).tolist()


@keras.saving.register_keras_serializable(package="kreg")
class Ensemble(keras.Model):
    """``k`` member models trained together in one `fit`, predicting as one.

    Each member trains exactly as it would alone: the loss is the sum of
    the members' own losses (under the loss's reduction, sample and class
    weights), plus their regularization losses. The ensemble predicts

    - ``combine="mean"``: ``mean_m f_m(x)``, the outputs averaged as they
      are: probabilities only where the members output probabilities;
    - ``combine="softmax"``: members output logits (compile with
      ``from_logits=True``); the ensemble outputs ``log(mean_m
      softmax(z_m))``, logits whose softmax is the averaged probability
      (``"sigmoid"`` likewise for one sigmoid unit).

    ``mode="bootstrap"`` is bagging (Breiman 1996) as the online bootstrap
    of Oza & Russell (2001): each member weighs each sample of each batch by
    its own draw ``K ~ Poisson(1)``; weights files (`BackupAndRestore`,
    ``.keras``) keep the draws' random state. ``mode="full"``: members see
    all the data and differ by their initialization. Members made from one
    model or factory whose initializers carry the same seeds draw their
    weights from seeds derived from those, their index and `seed` (member 0
    keeps its own).

    Train it as the model being fit (`fit`, `train_on_batch`): inside
    another model it predicts, and trains only frozen (``trainable=False``);
    put preprocessing layers inside each member instead.
    `kreg.models.predict_with_uncertainty` gives the members' spread.

    Args:
        members: a `keras.Model` (cloned ``num_members`` times:
            `keras.models.clone_model`), a function returning a new model
            (called ``num_members`` times), or a list of models (kept as
            they are; a warning if two have the same weights).
        num_members: ``k >= 1``. Defaults to `None`: the list's length,
            else 5.
        mode: ``"full"`` or ``"bootstrap"``. Defaults to `"full"`.
        combine: ``"mean"``, ``"softmax"`` or ``"sigmoid"``. Defaults to
            `"mean"`.
        seed: seed of the bootstrap draws and of derived initializer
            seeds. Defaults to `None`.
        vectorize: on PyTorch, run alike members as one ``torch.vmap``-ed
            call where that gives the same results (not members that draw
            random numbers); other backends ignore it. Defaults to `True`.

    Example:

    ```python
    ensemble = kreg.models.Ensemble(make_mlp, num_members=5,
                                    mode="bootstrap", combine="softmax")
    ensemble.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    ensemble.fit(x, y, validation_split=0.2, epochs=10)
    mean, spread = kreg.models.predict_with_uncertainty(ensemble, x_test)
    ```
    """

    def __init__(self, members, num_members=None, mode="full",
                 combine="mean", seed=None, vectorize=True, **kwargs):
        super().__init__(**kwargs)
        self.mode = check_one_of("mode", mode, ("full", "bootstrap"))
        self.combine = check_one_of(
            "combine", combine, ("mean", "softmax", "sigmoid"))
        self.seed = check_optional_seed("seed", seed)
        self.members = _make_members(members, num_members, self.seed)
        self.num_members = len(self.members)
        _check_output_activations(self.members, self.combine)
        self.vectorize = check_bool("vectorize", vectorize)
        self._stacked_members = StackedMembers(
            self.members, self.compute_dtype, enabled=self.vectorize)
        # Under tf.distribute each replica draws its own bootstrap weights.
        self.seed_generator = (ReplicaSeedGenerator(seed)
                               if mode == "bootstrap" else None)
        if all(member.built for member in self.members):
            if all(hasattr(m, "outputs") for m in self.members):
                _check_alike_outputs([m.outputs for m in self.members])
            self.build(None)

    def build(self, input_shape):
        for member in self.members:
            if not member.built:
                member.build(input_shape)

    def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
        for each in keras.tree.flatten(loss):
            from_logits = _from_logits(each)
            if self.combine != "mean" and from_logits is False:
                raise ValueError(
                    "Invalid value received for argument `loss`. Expected "
                    f"a loss with from_logits=True: with combine="
                    f"{self.combine!r} the members and the ensemble output "
                    f"logits. Received: loss={each!r}")
            if self.combine == "mean" and from_logits:
                warn_user(
                    "The loss has from_logits=True: the members output "
                    "logits, and with combine='mean' the ensemble averages "
                    "them as they are (its outputs are the mean logits, "
                    "not the mean probabilities). For the average of the "
                    "members' probabilities use combine='softmax' (or "
                    "'sigmoid').")
        super().compile(optimizer, loss, *args, **kwargs)

    def compile_from_config(self, config):
        # Keras's skips a custom `compile` (this one only adds checks,
        # which warned when the model was compiled).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The loss has from_logits")
            self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def train_step(self, *args, **kwargs):
        running = _training_ensembles()
        running.append(self)
        try:
            return super().train_step(*args, **kwargs)
        finally:
            running.pop()

    def call(self, inputs, training=False):
        members_train = bool(training) and self.trainable
        if members_train and not any(
                e is self for e in _training_ensembles()):
            raise ValueError(
                "An Ensemble trains each member on its own loss only as the "
                "model being fit (its own `fit` or `train_on_batch`), and "
                "it was called with training=True by another model (or "
                "directly). Put the layers before it (Rescaling, "
                "Normalization, ...) inside each member, or pass `members` "
                "a function that builds them, and fit the Ensemble itself. "
                "Inside another model it can predict, or train frozen "
                "(ensemble.trainable = False).")
        stacked = self._stacked_members(inputs, training)
        if stacked is None:
            outputs = [member(inputs, training=training)
                       for member in self.members]
        else:
            outputs, losses = stacked
            for loss in losses:
                self.add_loss(loss)
        _check_alike_outputs(outputs)
        if not members_train:
            return self.combine_outputs(outputs)
        result = {MEMBER_OUTPUTS: outputs}
        if self.seed_generator is not None:
            batch = ops.shape(keras.tree.flatten(inputs)[0])[0]
            result[BOOTSTRAP_WEIGHTS] = self.draw_bootstrap_weights(batch)
        return result

    def draw_bootstrap_weights(self, batch_size):
        """Each member's weight of each of `batch_size` samples, drawn from
        ``Poisson(1)``: shape ``(k, batch_size)`` (``mode="bootstrap"``)."""
        draws = keras.random.uniform((self.num_members, batch_size),
                                     seed=self.seed_generator)
        # K = the number of CDF values below the draw, counted in one
        # broadcast comparison, shape (k, batch, 12), not one per value.
        below = ops.greater(ops.expand_dims(draws, -1),
                            ops.convert_to_tensor(_POISSON_CDF))
        return ops.sum(ops.cast(below, "float32"), axis=-1)

    def combine_outputs(self, outputs):
        """The ensemble's prediction from the list of member outputs."""
        return keras.tree.map_structure(
            lambda *each: self._combine_one(list(each)), *outputs)

    def member_probabilities(self, outputs):
        """A member's outputs as probabilities (softmax/sigmoid of logits)."""
        return keras.tree.map_structure(self._probabilities, outputs)

    def _probabilities(self, output):
        if self.combine == "softmax":
            return ops.softmax(output, axis=-1)
        if self.combine == "sigmoid":
            return ops.sigmoid(output)
        return output

    def _combine_one(self, outputs):
        dtype = outputs[0].dtype
        if self.combine == "mean":
            return ops.mean(ops.stack(outputs), axis=0)
        z = ops.cast(ops.stack(outputs), "float32")
        log_k = math.log(len(outputs))
        if self.combine == "softmax":
            log_p = ops.logsumexp(ops.log_softmax(z, axis=-1), axis=0)
            return ops.cast(log_p - log_k, dtype)
        log_p = ops.logsumexp(ops.log_sigmoid(z), axis=0) - log_k
        log_not_p = ops.logsumexp(ops.log_sigmoid(-z), axis=0) - log_k
        return ops.cast(log_p - log_not_p, dtype)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if not _is_training_output(y_pred):
            return super().compute_loss(x, y, y_pred, sample_weight,
                                         training=training)
        draws = y_pred.get(BOOTSTRAP_WEIGHTS)
        total = None
        for m, output in enumerate(y_pred[MEMBER_OUTPUTS]):
            weight = sample_weight if draws is None else _times_draws(
                sample_weight, draws[m], y)
            # The member's loss alone, with the regularization losses.
            loss = super().compute_loss(x, y, output, weight,
                                        training=training)
            total = loss if total is None else total + loss
        if self.num_members > 1 and self.losses:
            # Count the regularization losses once.
            regularization = ops.sum([
                ops.sum(ops.cast(loss, total.dtype)) for loss in self.losses])
            total = total - (self.num_members - 1) * regularization
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if _is_training_output(y_pred):
            y_pred = self.combine_outputs(y_pred[MEMBER_OUTPUTS])
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.seed_generator is not None:
            store[_SEED_STATE] = self.seed_generator.state

    def load_own_variables(self, store):
        if self.seed_generator is not None and _SEED_STATE in store.keys():
            self.seed_generator.state.assign(store[_SEED_STATE])
        super().load_own_variables({key: store[key] for key in store.keys()
                                    if key != _SEED_STATE})

    def predict_members(self, x, batch_size=None):
        """Every member's prediction, as probabilities where the members
        output logits: NumPy arrays of shape ``(k, samples, ...)`` (one per
        output), from one compiled predict step."""
        view = _MEMBER_VIEWS.get(self)
        if view is None:
            view = _MEMBER_VIEWS[self] = _MemberPredictions(self)
        stacked = view.predict(x, batch_size=batch_size, verbose=0)
        return keras.tree.map_structure(
            lambda a: np.moveaxis(a, 1, 0), stacked)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "members": [keras.saving.serialize_keras_object(m)
                        for m in self.members],
            "mode": self.mode,
            "combine": self.combine,
            "seed": self.seed,
            "vectorize": self.vectorize,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        members = [
            keras.saving.deserialize_keras_object(
                m, custom_objects=custom_objects)
            for m in config.pop("members")]
        # The members' weights are loaded after: no warning that they are
        # the same before.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Members .* same weights")
            return cls(members, **config)


class _MemberPredictions(keras.Model):
    """The members' probabilities of an ensemble, stacked on axis 1."""

    def __init__(self, ensemble):
        super().__init__(name=f"{ensemble.name}_members")
        self.ensemble = ensemble

    def build(self, input_shape):
        if not self.ensemble.built:
            self.ensemble.build(input_shape)

    def call(self, inputs):
        outputs = [self.ensemble.member_probabilities(m(inputs))
                   for m in self.ensemble.members]
        _check_alike_outputs(outputs)
        return keras.tree.map_structure(
            lambda *each: ops.stack(each, axis=1), *outputs)


_MEMBER_VIEWS = weakref.WeakKeyDictionary()

# The ensembles whose `train_step` runs in this thread (a replica's thread
# under tf.distribute), innermost last.
_TRAINING = threading.local()


def _training_ensembles():
    if not hasattr(_TRAINING, "ensembles"):
        _TRAINING.ensembles = []
    return _TRAINING.ensembles


def _is_training_output(y_pred):
    return isinstance(y_pred, dict) and MEMBER_OUTPUTS in y_pred


def _times_draws(sample_weight, draws, targets):
    """A member's sample weights: the user's times its bootstrap `draws`
    (shape ``(batch,)``)."""
    if sample_weight is None:
        return keras.tree.map_structure(lambda _: draws, targets)

    def one(weight):
        weight = ops.convert_to_tensor(weight)
        shape = (-1,) + (1,) * (len(weight.shape) - 1)
        return weight * ops.cast(ops.reshape(draws, shape), weight.dtype)

    return keras.tree.map_structure(one, sample_weight)


def _from_logits(loss):
    """Whether a loss (a name, function or `keras.losses.Loss`) takes
    logits: True, False, or None where it has no such setting."""
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None
    if isinstance(loss, keras.losses.Loss):
        return loss.get_config().get("from_logits")
    if "crossentropy" in getattr(loss, "__name__", ""):
        return False
    return None


def _output_activation(member):
    """The name of the activation of `member`'s last layer, or None."""
    layers = member.layers if isinstance(member, keras.Model) else []
    if not layers:
        return None
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(last, "activation", None), "__name__", None)


def _check_output_activations(members, combine):
    if combine == "mean":
        return
    for index, member in enumerate(members):
        activation = _output_activation(member)
        if activation in ("softmax", "sigmoid"):
            raise ValueError(
                f"Invalid value received for argument `combine`. Expected "
                f"'mean' for members that output probabilities: combine="
                f"{combine!r} takes the members' outputs as logits, and "
                f"member {index}'s last layer '{member.layers[-1].name}' "
                f"ends in a {activation} activation. Remove it (and compile "
                f"with from_logits=True) or use combine='mean'. Received: "
                f"combine={combine!r}")


def _check_alike_outputs(outputs):
    """Raises naming `members` where the members' outputs differ in
    structure or in their shapes past the batch axis."""
    def shapes(output):
        return [tuple(t.shape)[1:] for t in keras.tree.flatten(output)]

    def alike(a, b):
        return len(a) == len(b) and all(
            i is None or j is None or i == j for i, j in zip(a, b))

    for output in outputs[1:]:
        try:
            keras.tree.assert_same_structure(outputs[0], output)
            same = all(alike(a, b) for a, b in zip(shapes(outputs[0]),
                                                   shapes(output)))
        except (ValueError, TypeError):
            same = False
        if not same:
            raise ValueError(
                "Invalid value received for argument `members`. Expected "
                "members whose outputs have the same structure and shapes. "
                "Received: members with outputs of shapes (past the batch "
                f"axis) {[shapes(o) for o in outputs]}")


def _make_members(members, num_members, seed):
    num_members = check_integer("num_members", num_members, low=1,
                                allow_none=True)
    count = 5 if num_members is None else num_members
    if isinstance(members, (list, tuple)):
        if num_members is not None and num_members != len(members):
            raise ValueError(
                f"Invalid value received for argument `num_members`. "
                f"Expected the length of `members` ({len(members)}). "
                f"Received: num_members={num_members!r}")
        made = list(members)
    elif isinstance(members, keras.Model):
        made = [keras.models.clone_model(members) for _ in range(count)]
    elif isinstance(members, keras.layers.Layer):
        raise TypeError(
            "Invalid value received for argument `members`. Expected a "
            "keras.Model, a function returning one, or a list of models; "
            "a layer is not a model: wrap it, e.g. keras.Sequential("
            f"[keras.Input(shape), layer]). Received: members={members!r}")
    elif callable(members):
        made = [members() for _ in range(count)]
    else:
        raise TypeError(
            "Invalid value received for argument `members`. Expected a "
            "keras.Model, a function returning one, or a list of models. "
            f"Received: members={members!r}")
    for member in made:
        if not isinstance(member, keras.Model):
            raise TypeError(
                "Invalid value received for argument `members`: every "
                f"member must be a keras.Model. Received: {member!r}")
    if len({id(m) for m in made}) != len(made) or not made:
        raise ValueError(
            "Invalid value received for argument `members`. Expected "
            "distinct models (a function must return a new model at each "
            f"call). Received: members={members!r}")
    if not isinstance(members, (list, tuple)):
        vary_seeded_initializers(made, seed)
    warn_if_identical(made)
    return made
