"""The MIL opset's input specifications, as one table (:mod:`mljax.mil.opspecs`, generated).

Every consumer reads the same facts from here: the loader validates a program's ops against
it (:func:`check_op_inputs`), the writer and the text printer order inputs by it
(:func:`input_order`), and ``tests/mljax/test_op_specs.py`` holds every implementation in
:mod:`mljax.ops` to it (input names, order, which must be constants).  It sits in ``mljax.mil``
(the IR layer) so that writing a program never imports the op implementations.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

from mljax.errors import ModelFormatError
from mljax.mil.opspecs import SPECS

__all__ = ["InputSpec", "OPSETS", "check_op_inputs", "input_order", "op_inputs", "opset_number"]

#: Opset names as they appear in a program, and the iOS release each one is.
OPSETS = {"CoreML5": 15, "CoreML6": 16, "CoreML7": 17, "CoreML8": 18, "CoreML9": 19}

#: ``default`` markers of the table (every other value is the default itself).
REQUIRED, NO_DEFAULT, FROM_INPUTS = "<required>", "<none>", "<depends on inputs>"


class InputSpec(NamedTuple):
    name: str
    kind: str                 # tensor, list, tuple, state or any
    const: bool               # the value must be known before execution
    optional: bool
    default: object           # REQUIRED, NO_DEFAULT, FROM_INPUTS or the value
    dtypes: tuple[str, ...]   # allowed MIL dtypes; empty: not restricted


def opset_number(opset: str | int) -> int:
    """``"CoreML7"`` / ``"iOS17"`` / ``17`` -> ``17``."""
    if isinstance(opset, int):
        return opset
    if opset in OPSETS:
        return OPSETS[opset]
    if opset.startswith("iOS") and opset[3:].isdigit():
        return int(opset[3:])
    raise ValueError(f"unknown opset {opset!r}; expected one of {sorted(OPSETS)} or 'iOS15'..'iOS18'")


@functools.lru_cache(maxsize=None)
def op_inputs(op_type: str, opset: str | int) -> tuple[InputSpec, ...] | None:
    """The inputs of ``op_type`` at ``opset`` (the newest definition at or before it), in MIL
    order; None for an op the table does not define."""
    per = SPECS.get(op_type)
    if not per:
        return None
    number = opset_number(opset)
    found = [v for k, v in per.items() if k <= number]
    if not found:
        return None
    return tuple(InputSpec(*row) for row in found[-1])


def input_order(op_type: str, opset: str | int) -> list[str]:
    """The MIL order of ``op_type``'s input names (empty for an op the table does not define)."""
    return [i.name for i in op_inputs(op_type, opset) or ()]


def check_op_inputs(op_type: str, opset: str | int, given, where: str, attributes=()) -> None:
    """ModelFormatError unless the input names ``given`` are ones ``op_type`` takes at ``opset``
    and every required input is among them or among the op's ``attributes`` (constexpr ops hold
    their values there).  Ops the table does not define pass (the lowering reports them as
    unsupported)."""
    spec = op_inputs(op_type, opset)
    if spec is None:
        return
    names = {i.name for i in spec}
    unknown = sorted(set(given) - names)
    missing = [i.name for i in spec if not i.optional and i.name not in given and i.name not in attributes]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"inputs {unknown} that it does not take")
        if missing:
            problems.append(f"no value for its required inputs {missing}")
        raise ModelFormatError(
            f"{where}: {op_type} (iOS{opset_number(opset)}) has {' and '.join(problems)}; "
            f"it takes {[i.name + ('' if not i.optional else '?') for i in spec]} ('?': optional)")
