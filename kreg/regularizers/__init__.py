"""kreg.regularizers: filled by a later issue (see README.md, "Status").

Nothing is exported yet; importing this module is safe and gives no objects.
"""

__all__ = []
