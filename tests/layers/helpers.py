"""Shared checks of the layer tests."""


def assert_builds_as_keras(test, ours, reference, x, *args):
    """A subclass with its own `build` gets it called once, at the first
    call, for kreg's layer class `ours` as for Keras's `reference`; without
    one, both are built at construction."""

    def subclass(base):
        class WithBuild(base):
            def build(self, input_shape):
                self.build_shapes = getattr(self, "build_shapes", [])
                self.build_shapes.append(tuple(input_shape))

        return WithBuild

    for layer in (subclass(ours)(*args), subclass(reference)(*args)):
        test.assertFalse(layer.built)
        layer(x, training=True)
        layer(x, training=True)
        test.assertTrue(layer.built)
        test.assertEqual(layer.build_shapes, [x.shape])
    test.assertTrue(ours(*args).built)
    test.assertTrue(reference(*args).built)
