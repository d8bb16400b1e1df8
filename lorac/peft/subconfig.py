"""A LoraConfig's sub-config fields (eva_config, corda_config, lora_ga_config)."""

from collections.abc import Mapping


def sub_config(value, cls, field, func):
    """``value`` as a ``cls`` instance: None and instances pass, a dict of its fields (as PEFT
    accepts) is converted; anything else is a TypeError naming ``field``."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except TypeError as exc:
            raise TypeError(f"{func}: {field}: {exc}") from None
    raise TypeError(f"{func}: {field} must be a lorac.{cls.__name__} or a dict of its fields, got "
                    f"{type(value).__name__}")
