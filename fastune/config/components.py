"""``_component_`` nodes: a dotted path to a callable plus its keyword arguments.

Builders, not registries of magic strings: ``optimizer: {_component_:
torch.optim.AdamW, lr: 2e-4}`` is ``torch.optim.AdamW(params, lr=2e-4)``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from fastune.config.schema import COMPONENT, did_you_mean
from fastune.errors import ConfigError


def locate(dotted: str) -> Any:
    """Import ``package.module.attr`` (attributes may nest). Raises ``ImportError``
    with a message that says which part is missing."""
    parts = dotted.split(".") if isinstance(dotted, str) else []
    if not parts or not all(p.isidentifier() for p in parts):
        raise ImportError(f"{dotted!r} is not a dotted Python path like torch.optim.AdamW")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
            break
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" means: try a shorter prefix. A module
            # that exists but fails to import one of its own dependencies is reported.
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise ImportError(f"importing {name} failed: {e}") from e
    else:
        raise ImportError(f"no module named {parts[0]!r}")
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ImportError(f"{getattr(obj, '__name__', obj)!s} has no attribute {attr!r}"
                              f"{did_you_mean(attr, names)}")
        obj = getattr(obj, attr)
    return obj


def instantiate(node: DictConfig | Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``node._component_`` with ``*args``, the node's other keys, and ``**kwargs``
    (which win over the node's keys)::

        optimizer = instantiate(cfg.optimizer, model.parameters())
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping) or COMPONENT not in node:
        raise ConfigError(f"nothing to instantiate: no {COMPONENT} in {node!r}")
    try:
        fn: Callable = locate(node[COMPONENT])
    except ImportError as e:
        raise ConfigError(f"{COMPONENT}: cannot import {node[COMPONENT]!r}: {e}") from e
    config_kwargs = {k: v for k, v in node.items() if k != COMPONENT}
    return fn(*args, **{**config_kwargs, **kwargs})
