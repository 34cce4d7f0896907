"""Ensemble: k member models trained together in one `fit`."""

import math
import weakref

import keras
import numpy as np
from keras import ops

from kreg.models._stacked_members import StackedMembers
from kreg.utils.distribute import ReplicaSeedGenerator
from kreg.utils.validation import check_bool, check_integer, check_one_of
from kreg.utils.validation import check_optional_seed

# The key of the training output (see `Ensemble.call`).
MEMBER_OUTPUTS = "kreg_member_outputs"
BOOTSTRAP_WEIGHTS = "kreg_bootstrap_weights"

# P(K <= j) for K ~ Poisson(1), j = 0, 1, ..., 11 (P(K > 12) < 1e-10).
_POISSON_CDF = np.cumsum(
    [math.exp(-1.0) / math.factorial(j) for j in range(12)]).tolist()


@keras.saving.register_keras_serializable(package="kreg")
class Ensemble(keras.Model):
    """``k`` member models trained together in one `fit`, predicting as one.

    Each member is trained on its own loss, exactly as it would be alone:
    the training loss is ``sum_m L_m`` plus the members' regularization
    losses, so each member gets its own gradient. The ensemble predicts

    - ``combine="mean"``: ``mean_m f_m(x)`` (probabilities, or regression);
    - ``combine="softmax"``: members output logits; the ensemble outputs
      ``log(mean_m softmax(z_m))``, logits whose softmax is the averaged
      probability (``"sigmoid"`` likewise for one sigmoid unit), so that the
      members' loss (``from_logits=True``) also fits the ensemble.

    ``val_loss`` and every compiled metric are the ensemble's. Two modes:

    - ``mode="bootstrap"`` (bagging, Breiman 1996), as the online bootstrap
      of Oza & Russell (2001): each member weighs each sample of each batch
      by its own draw ``K ~ Poisson(1)``; a member skips a sample with
      probability ``1/e`` (0.368) per epoch, as in a bootstrap sample.
    - ``mode="full"``: every member sees all the data; members differ by
      their initialization (and their noise layers' draws).

    Called with ``training=True`` the model returns ``{MEMBER_OUTPUTS:
    [f_1(x), ...]}`` (and ``BOOTSTRAP_WEIGHTS``, shape ``(k, batch)``) for
    `compute_loss`; use it as the top model, not as a layer.
    `kreg.models.predict_with_uncertainty` gives the members' mean and spread.

    Args:
        members: a `keras.Model` (cloned ``num_members`` times with fresh
            weights: `keras.models.clone_model`), a function returning a
            new model (called ``num_members`` times), or a list of models.
        num_members: the number of members ``k >= 1``. Defaults to `None`:
            the length of a list, else 5.
        mode: ``"full"`` or ``"bootstrap"``. Defaults to `"full"`.
        combine: ``"mean"``, ``"softmax"`` or ``"sigmoid"``. Defaults to
            `"mean"`.
        seed: seed of the bootstrap draws. Defaults to `None`.
        vectorize: on PyTorch, run the members as one ``torch.vmap``-ed
            call of the first member where they are alike (checked at the
            first call in training and in inference against calling them
            one by one), which saves Keras's per-layer Python overhead.
            Members that draw random numbers (dropout, noise) or use mixed
            precision run one by one. `False` always calls them one by one.
            TensorFlow and JAX compile the loop and ignore it. Defaults to
            `True`.

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
        self.members = _make_members(members, num_members)
        self.num_members = len(self.members)
        self.vectorize = check_bool("vectorize", vectorize)
        self._stacked_members = StackedMembers(
            self.members, self.compute_dtype, enabled=self.vectorize)
        # Under tf.distribute each replica draws its own bootstrap weights.
        self.seed_generator = (ReplicaSeedGenerator(seed)
                               if mode == "bootstrap" else None)

    def build(self, input_shape):
        for member in self.members:
            if not member.built:
                member.build(input_shape)

    def call(self, inputs, training=False):
        stacked = self._stacked_members(inputs, training)
        if stacked is None:
            outputs = [member(inputs, training=training)
                       for member in self.members]
        else:
            outputs, losses = stacked
            for loss in losses:
                self.add_loss(loss)
        if not training:
            return self.combine_outputs(outputs)
        result = {MEMBER_OUTPUTS: outputs}
        if self.seed_generator is not None:
            batch = ops.shape(keras.tree.flatten(inputs)[0])[0]
            draws = keras.random.uniform((self.num_members, batch),
                                         seed=self.seed_generator)
            # K = the number of CDF values below the draw, counted in one
            # broadcast comparison, shape (k, batch, 12), not one per value.
            below = ops.greater(ops.expand_dims(draws, -1),
                                ops.convert_to_tensor(_POISSON_CDF))
            result[BOOTSTRAP_WEIGHTS] = ops.sum(
                ops.cast(below, "float32"), axis=-1)
        return result

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
        outputs = y_pred[MEMBER_OUTPUTS]
        k = len(outputs)
        # One loss over the members' outputs stacked along the batch axis;
        # the weight k turns the mean over k * batch samples into the sum
        # of the members' mean losses.
        stacked = keras.tree.map_structure(
            lambda *each: ops.concatenate(each, axis=0), *outputs)
        targets = keras.tree.map_structure(
            lambda t: ops.concatenate([t] * k, axis=0), y)
        factors = y_pred.get(BOOTSTRAP_WEIGHTS)
        if factors is None and sample_weight is None and k == 1:
            weights = None
        else:
            if factors is None:
                batch = ops.shape(keras.tree.flatten(outputs[0])[0])[0]
                factors = ops.ones((k, batch))
            factors = ops.reshape(factors * float(k), (-1,))
            weights = _times_factors(sample_weight, factors, targets, k)
        return super().compute_loss(x, targets, stacked, weights,
                                     training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if _is_training_output(y_pred):
            y_pred = self.combine_outputs(y_pred[MEMBER_OUTPUTS])
        return super().compute_metrics(x, y, y_pred, sample_weight)

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
        return cls(members, **config)


class _MemberPredictions(keras.Model):
    """The members' probabilities of an ensemble, stacked on axis 1."""

    def __init__(self, ensemble):
        super().__init__(name=f"{ensemble.name}_members")
        self.ensemble = ensemble

    def call(self, inputs):
        outputs = [self.ensemble.member_probabilities(m(inputs))
                   for m in self.ensemble.members]
        return keras.tree.map_structure(
            lambda *each: ops.stack(each, axis=1), *outputs)


_MEMBER_VIEWS = weakref.WeakKeyDictionary()


def _is_training_output(y_pred):
    return isinstance(y_pred, dict) and MEMBER_OUTPUTS in y_pred


def _times_factors(sample_weight, factors, targets, k):
    """The sample weights of the stacked members' outputs: the user's
    (repeated k times) times the per-member, per-sample `factors`."""
    if sample_weight is None:
        return keras.tree.map_structure(lambda _: factors, targets)

    def one(weight):
        weight = ops.concatenate([weight] * k, axis=0)
        shape = (-1,) + (1,) * (len(weight.shape) - 1)
        return weight * ops.cast(ops.reshape(factors, shape), weight.dtype)

    return keras.tree.map_structure(one, sample_weight)


def _make_members(members, num_members):
    num_members = check_integer("num_members", num_members, low=1,
                                allow_none=True)
    if isinstance(members, (list, tuple)):
        if num_members is not None and num_members != len(members):
            raise ValueError(
                f"Invalid value received for argument `num_members`. "
                f"Expected the length of `members` ({len(members)}). "
                f"Received: num_members={num_members!r}")
        made = list(members)
    elif isinstance(members, keras.Model):
        made = [keras.models.clone_model(members)
                for _ in range(5 if num_members is None else num_members)]
    elif callable(members):
        made = [members()
                for _ in range(5 if num_members is None else num_members)]
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
    return made
