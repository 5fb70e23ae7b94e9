"""Operation counting and state resets for module trees, with the published implementation's names.

:class:`ExtendedModule` is the base of every compatibility module: ``reset()`` forgets the per-stream state of the
whole tree (each module's ``reset_self()``), ``counting()`` / ``no_counting()`` switch operation counting on and
off, ``total_counts()`` sums the :class:`Counts` of the tree and ``clear_counts()`` zeroes them. A published-style
block written as an ``ExtendedModule`` subclass keeps all of that when it switches to these modules.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Type

from torch import nn


class Counts(defaultdict):
    """Operation counts by name (``"gate_flops"``, ``"matmul_flops"``, ...), missing names reading 0.

    Arithmetic acts on the values: ``a + b`` adds counts name by name (a number is added to every value),
    ``a * s`` / ``a / s`` scale them, ``-a`` negates, ``a - b`` subtracts.
    """

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            super().__init__(*args, **kwargs)
        else:
            super().__init__(int)

    def _mapped(self, fn) -> "Counts":
        out = self.copy()
        for key in out:
            out[key] = fn(out[key])
        return out

    def __add__(self, other):
        if isinstance(other, Counts):
            out = self.copy()
            for key, value in other.items():
                out[key] += value
            return out
        return self._mapped(lambda v: v + other)

    __radd__ = __add__

    def __mul__(self, other):
        return self._mapped(lambda v: v * other)

    __rmul__ = __mul__

    def __neg__(self):
        return self._mapped(lambda v: -v)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __truediv__(self, other):
        return self._mapped(lambda v: v / other)

    def csv_header(self) -> str:
        """The names, sorted, comma-separated."""
        return ",".join(sorted(self))

    def csv_line(self) -> str:
        """The values in :meth:`csv_header` order, comma-separated (``%g``)."""
        return ",".join(f"{self[key]:g}" for key in sorted(self))

    def pretty_print(self, indent=4, value_format=".3e", file=None, flush=False) -> None:
        """One ``name: value`` line per count, names sorted and aligned."""
        width = max((len(str(k)) for k in self), default=0) + 1
        lines = [" " * indent + f"{str(k) + ':':<{width}} {self[k]:{value_format}}" for k in sorted(self)]
        print("\n".join(lines), file=file, flush=flush)


class ExtendedModule(nn.Module):
    """``nn.Module`` with operation counting (``count_mode``, ``counts``) and tree-wide state resets."""

    def __init__(self):
        super().__init__()
        self.count_mode = False
        self.counts = Counts()

    def modules_of_type(self, module_type: Type[nn.Module]) -> Iterator[nn.Module]:
        """Every module of the tree (this one included) that is a ``module_type``."""
        return (m for m in self.modules() if isinstance(m, module_type))

    def extended_modules(self) -> Iterator["ExtendedModule"]:
        return self.modules_of_type(ExtendedModule)

    def counting(self, mode: bool = True) -> None:
        """Switch operation counting on (or off with ``mode=False``) in the whole tree."""
        for m in self.extended_modules():
            m.count_mode = mode

    def no_counting(self) -> None:
        self.counting(False)

    def clear_counts(self) -> None:
        for m in self.extended_modules():
            m.counts.clear()

    def total_counts(self) -> Counts:
        """The counts of the whole tree, summed name by name."""
        total = Counts()
        for m in self.extended_modules():
            total = total + m.counts
        return total

    def reset(self) -> None:
        """Forget the per-stream state of the whole tree: the next call of each module is a flush."""
        for m in self.extended_modules():
            m.reset_self()

    def reset_self(self) -> None:
        """Forget this module's own state (subclasses with state override it)."""
