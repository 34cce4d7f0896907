"""An ensemble's members start from different weights."""

import keras
import numpy as np

from kreg.utils.layers import walk_layers
from kreg.utils.warn import warn_user


def vary_seeded_initializers(model, index, seed):
    """Gives member `index` of an ensemble made from one model or factory
    draws of its own where an initializer carries an integer seed (which
    would draw the same weights in every member).

    Each such initializer is replaced by one seeded from its seed, `index`
    and the ensemble's `seed`; a variable it made is drawn again from the
    new one unless it changed since (weights the factory loaded).
    """
    for layer, _ in walk_layers(model):
        for name, initializer in list(vars(layer).items()):
            if name.startswith("_") or not name.endswith("_initializer") or (
                    not isinstance(initializer,
                                   keras.initializers.Initializer)):
                continue
            config = initializer.get_config()
            user_seed = config.get("seed")
            if not isinstance(user_seed, int) or isinstance(user_seed, bool):
                continue
            entropy = [user_seed % 2**32, index]
            if seed is not None:
                entropy.append(seed)
            config["seed"] = int(
                np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)
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
