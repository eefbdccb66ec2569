"""The registry of architectures our own checkpoint format can save and load, filled where each is defined.

A model class joins with ``@register_architecture("name")`` on its definition; ``save_pretrained`` writes
that name into ``config.json`` and ``load_pretrained`` finds the class by it. A class needs
``config_class`` (with ``from_dict``) and ``.config`` (with ``to_dict``), or a ``checkpoint_config()``
method returning that dict. Importing ``marval_rl.models`` registers every built-in architecture; a
user's own class registers when its module is imported, so nothing here names a module above it.
"""
from __future__ import annotations

from torch import nn

ARCHITECTURES: dict[str, type[nn.Module]] = {}


def register_architecture(name: str):
    """Class decorator: make ``cls`` saveable and loadable under ``name``."""
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if not hasattr(cls, "config_class"):
            raise TypeError(f"{cls.__name__} needs a config_class (with from_dict) to be saved as '{name}'")
        known = ARCHITECTURES.get(name)
        if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"architecture name '{name}' is taken by {known.__module__}.{known.__qualname__}")
        ARCHITECTURES[name] = cls
        return cls
    return register


def architecture_name(model: nn.Module) -> str | None:
    """The registered name of ``model``'s exact class (a subclass must register itself), or None."""
    return next((name for name, cls in ARCHITECTURES.items() if type(model) is cls), None)
