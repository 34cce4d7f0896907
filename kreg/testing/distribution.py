"""Distributions for tests: one process-wide `tf.distribute.MirroredStrategy`
and `keras.distribution.DataParallel` on JAX devices."""

import contextlib
import unittest

_MIRRORED = []


def mirrored_strategy():
    """A MirroredStrategy on two logical CPUs, shared by the whole process.

    Needs two logical CPU devices configured before TensorFlow runs any op
    (kreg's tests/conftest.py does it). It reduces through one device rather
    than with collective ops: the collective keys of several
    MirroredStrategy objects in one process collide ("Shape mismatch in the
    collective instance"), so every test must use this one.
    """
    import tensorflow as tf

    if not _MIRRORED:
        _MIRRORED.append(
            tf.distribute.MirroredStrategy(
                ["/cpu:0", "/cpu:1"],
                cross_device_ops=tf.distribute.ReductionToOneDevice(),
            )
        )
    return _MIRRORED[0]


@contextlib.contextmanager
def jax_data_parallel(count=2):
    """Runs the block under `keras.distribution.DataParallel` on JAX.

    Uses the first `count` devices (on CPU: host devices created with
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX starts,
    as kreg's tests/conftest.py does) and restores the previous
    distribution afterwards. Raises `unittest.SkipTest` when fewer devices
    exist.
    """
    import keras

    devices = keras.distribution.list_devices()
    if len(devices) < count:
        raise unittest.SkipTest(
            f"needs {count} JAX devices, found {len(devices)} "
            "(see tests/conftest.py)"
        )
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices[:count])
    )
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)
