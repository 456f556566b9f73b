"""Checks of user-given numbers, shared by the Python API and every command line module.

A value the user gave is used or refused, never replaced by a default: the functions here raise
(``ValueError`` / ``TypeError`` for the API, ``argparse.ArgumentTypeError`` for ``type=``) with
a message that names the argument, what was expected and what came.

    steps = check_int("steps", steps, min=1)                 # API: 0, -1, 1.5, True refused
    p.add_argument("--steps", type=positive_int)             # CLI: "0", "1.5", "x" refused
    p.add_argument("--lr", type=positive_float)              # "0", "nan", "inf" refused
"""
from __future__ import annotations

import argparse
import math
from numbers import Integral, Real

__all__ = ["check_int", "check_float", "positive_int", "non_negative_int", "positive_float",
           "non_negative_float", "fraction", "non_empty_str", "memory_size", "parse_memory_size"]


def check_int(name: str, value, *, min: int | None = None, max: int | None = None) -> int:
    """``value`` as an int, or a ValueError/TypeError naming ``name``.

    Floats (even ``2.0``), bools and strings are refused: a step count of 1.5 is a mistake, not 1.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"expected {name} to be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if min is not None and value < min:
        raise ValueError(f"expected {name} >= {min}, got {value}")
    if max is not None and value > max:
        raise ValueError(f"expected {name} <= {max}, got {value}")
    return value


def check_float(name: str, value, *, min: float | None = None, positive: bool = False,
                max: float | None = None) -> float:
    """``value`` as a finite float (ints accepted), or a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"expected {name} to be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite {name}, got {value}")
    if positive and value <= 0:
        raise ValueError(f"expected {name} > 0, got {value:g}")
    if min is not None and value < min:
        raise ValueError(f"expected {name} >= {min:g}, got {value:g}")
    if max is not None and value > max:
        raise ValueError(f"expected {name} <= {max:g}, got {value:g}")
    return value


# -- argparse ``type=`` functions -------------------------------------------------------------
# argparse prints "argument --steps: <message>", so the messages start with what was expected.

def _int_type(text: str, low: int, what: str) -> int:
    try:
        value = int(text.strip())
    except (ValueError, AttributeError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _float_type(text: str, what: str, ok) -> float:
    try:
        value = float(text.strip())
    except (ValueError, AttributeError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_type(text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_type(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_type(text, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_type(text, "a finite number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    return _float_type(text, "a number between 0 and 1 (exclusive)", lambda v: 0 < v < 1)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1) (a dropout rate)."""
    return _float_type(text, "a probability in [0, 1)", lambda v: 0 <= v < 1)


def non_empty_str(text: str) -> str:
    """argparse type: a string with something other than spaces in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return text


_MEMORY_UNITS = {"TIB": 2 ** 40, "GIB": 2 ** 30, "MIB": 2 ** 20, "KIB": 2 ** 10, "TB": 10 ** 12,
                 "GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "T": 2 ** 40, "G": 2 ** 30,
                 "M": 2 ** 20, "K": 2 ** 10, "B": 1}


def parse_memory_size(text: str, who: str = "max_memory") -> int:
    """``"8GB"`` (10**9), ``"512MiB"`` / ``"512M"`` (2**20), ``"1.5GiB"``, ``"2e9"`` -> bytes (an int
    > 0); anything else (0, negative, not finite, no number) is a ValueError naming ``who``."""
    text_ = str(text).strip().upper().replace(" ", "")
    for unit, mult in _MEMORY_UNITS.items():
        if text_.endswith(unit):
            num = text_[:-len(unit)]
            break
    else:
        num, mult = text_, 1
    try:
        n = float(num) * mult
    except ValueError:
        n = float("nan")
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"expected {who} like 8GB, 512MiB or a number of bytes, got {text!r}")
    return int(n)


def memory_size(text: str) -> int:
    """argparse type: a memory size > 0, ``512MB``, ``8GB``, ``1.5GiB`` or plain bytes -> bytes."""
    try:
        return parse_memory_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a memory size > 0 like 512MB, 8GB, 1.5GiB or a "
                                         f"number of bytes, got {text!r}") from None


# -- output paths, checked before any work ----------------------------------------------------

def check_output_file(path, option: str = "output") -> None:
    """Refuse, before any computation, an output file path that is a folder or lies under a file."""
    if path is None:
        return
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} expects a file path, got a directory: {p}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option}: cannot write {p}: {parent} is a file, not a directory")
            break


def check_output_dir(path, option: str = "output folder") -> None:
    """Refuse, before any computation, an output folder path that is an existing file."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} expects a folder, got an existing file: {p}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option}: cannot create {p}: {parent} is a file, not a directory")
            break
