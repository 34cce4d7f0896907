"""Internal helpers shared by kreg's public pieces (not public API)."""
