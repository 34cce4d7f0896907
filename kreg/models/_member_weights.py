"""An ensemble's members start from different weights."""

import keras
import numpy as np

from kreg.utils.layers import walk_layers
from kreg.utils.warn import warn_user


def vary_seeded_initializers(members, seed):
    """Gives the members of an ensemble made from one model or factory
    draws of their own where an initializer carries the same integer seed
    as the one in member 0's same place (which would draw the same
    weights).

    Such an initializer of member ``i > 0`` is replaced by one seeded from
    its seed, ``i`` and the ensemble's `seed`; a variable it made is drawn
    again from the new one unless it changed since (weights the factory
    loaded).
    """
    first = [user_seed for *_, user_seed in _seeded_initializers(members[0])]
    for index, member in enumerate(members[1:], start=1):
        for place, (layer, name, initializer, user_seed) in enumerate(
                _seeded_initializers(member)):
            if place >= len(first) or first[place] != user_seed:
                continue
            entropy = [user_seed % 2**32, index]
            if seed is not None:
                entropy.append(seed)
            config = dict(initializer.get_config(), seed=int(
                np.random.SeedSequence(entropy).generate_state(1)[0] >> 1))
            replacement = type(initializer).from_config(config)
            setattr(layer, name, replacement)
            variable = getattr(layer, name[:-len("_initializer")], None)
            if not isinstance(variable, keras.Variable):
                continue
            shape, dtype = tuple(variable.shape), variable.dtype
            if np.array_equal(keras.ops.convert_to_numpy(variable),
                              keras.ops.convert_to_numpy(
                                  initializer(shape, dtype=dtype))):
                variable.assign(replacement(shape, dtype=dtype))


def _seeded_initializers(model):
    """``(layer, attribute, initializer, seed)`` for every initializer
    with an integer seed in `model`'s layers (``*_initializer``
    attributes), in one order."""
    found = []
    for layer, _ in walk_layers(model):
        for name, initializer in vars(layer).items():
            if name.startswith("_") or not name.endswith("_initializer") or (
                    not isinstance(initializer,
                                   keras.initializers.Initializer)):
                continue
            user_seed = initializer.get_config().get("seed")
            if isinstance(user_seed, int) and not isinstance(user_seed, bool):
                found.append((layer, name, initializer, user_seed))
    return found


def warn_if_identical(members):
    """Warns when two built members have the same weights."""
    cache = {}

    def value(m, i):
        if (m, i) not in cache:
            cache[m, i] = keras.ops.convert_to_numpy(members[m].weights[i])
        return cache[m, i]

    built = [m for m, member in enumerate(members)
             if member.built and member.weights]
    for position, first in enumerate(built):
        for second in built[position + 1:]:
            count = len(members[first].weights)
            if count != len(members[second].weights):
                continue
            if all(value(first, i).shape == value(second, i).shape
                   and np.array_equal(value(first, i), value(second, i))
                   for i in range(count)):
                warn_user(
                    f"Members {first} and {second} of the Ensemble have the "
                    "same weights: trained on the same data they stay "
                    "alike. Give the members different initial weights "
                    "(initializers without seeds or with different seeds), "
                    "or pass one model or a function returning one as "
                    "`members`.")
                return
