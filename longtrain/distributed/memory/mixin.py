"""Give one module a mixin, in place, as `fully_shard` does: its class becomes a subclass of
(mixin, its class), so parameters, their names and state dicts do not change."""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def _with_mixin(mixin: type, cls: type, prefix: str) -> type:
    # One subclass per (mixin, class): modules of one class share it, as instances should.
    return type(f"{prefix}{cls.__name__}", (mixin, cls), {})


def mix_into(module: nn.Module, mixin: type, prefix: str) -> nn.Module:
    """Make `module` an instance of `<prefix><its class name>`, a subclass of (mixin, its
    class); idempotent."""
    if not isinstance(module, mixin):
        module.__class__ = _with_mixin(mixin, type(module), prefix)
    return module


__all__ = ["mix_into"]
