"""The kreg walkthrough: controlled experiments on real, offline data.

Run it with ``python -m kreg.walkthrough`` (needs the ``examples`` extra:
scikit-learn and matplotlib). See ``python -m kreg.walkthrough --help``.
"""
