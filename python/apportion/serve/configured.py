"""The signatures a config file declares (``[models.<name>.signature]``), for ``apportion serve``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .tensors import Signature, TensorSpec

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["signatures"]


def signatures(cfg: Config) -> dict[str, Signature]:
    """Each model's declared signature, by name (models without one are not served). Raises
    ConfigError naming the file and the key of a tensor that is not valid, or when no model
    declares one."""
    from ..config import ConfigError, model_key

    out: dict[str, Signature] = {}
    for m in cfg.models.values():
        if not m.signature:
            continue
        key = f"{model_key(m.name)}.signature"
        sides = {}
        for side in ("inputs", "outputs"):
            specs = []
            for i, t in enumerate(m.signature[side]):
                missing = [k for k in ("name", "datatype", "shape") if k not in t]
                if missing:
                    raise ConfigError(cfg.path, f"{key}.{side}[{i}].{missing[0]}", "missing")
                shape = t["shape"]
                try:
                    specs.append(TensorSpec(t["name"], t["datatype"],
                                            tuple(shape) if isinstance(shape, list) else shape))
                except ValueError as e:
                    raise ConfigError(cfg.path, f"{key}.{side}[{i}]", str(e)) from None
            sides[side] = specs
        try:
            out[m.name] = Signature(sides["inputs"], sides["outputs"], m.signature.get("tensor", "numpy"))
        except ValueError as e:
            # Filed under the key Signature names ("names ['x'] more than once" is the inputs'
            # fault, not the tensor kind's).
            named = re.match(r"Signature: field '(inputs|outputs|tensor)' (.*)", str(e), re.S)
            field, message = (named.group(1), named.group(2)) if named else ("tensor", str(e))
            raise ConfigError(cfg.path, f"{key}.{field}", message) from None
    if not out:
        raise ConfigError(cfg.path, "models", "no model declares a signature: add [models.<name>.signature] "
                          'with inputs = [{ name = "x", datatype = "FP32", shape = [-1] }] and outputs')
    return out
