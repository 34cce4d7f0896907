"""One process-wide `tf.distribute.MirroredStrategy` for tests."""

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
