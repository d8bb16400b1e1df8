"""A layer's plain attributes, for tests that compare two layers' state."""

SKIPPED = ("_parameters", "_modules", "rng", "_cache", "_lock", "_tls")


def state_attributes(layer):
    """vars(layer) without its parameters, children, generator, forward cache
    and lock / thread state (objects that differ between equal layers)."""
    return {k: v for k, v in vars(layer).items() if k not in SKIPPED}
