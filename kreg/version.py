"""The version of kreg, read by setup.cfg and exported as `kreg.__version__`."""

__version__ = "0.1.0"
