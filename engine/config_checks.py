"""The value checkers of the config schema (engine.config): strict scalars, lists and rules.

fastargs' own checkers accept what Python's casts accept (1.5 -> 1, 'False' -> True); these refuse it. check()
returns the typed value or raises ValueError; help() is the text `run.py train --help` shows.
"""
import math
import os

from fastargs import Param
from fastargs.validation import Checker


class Strict(Checker):
    """int / float / bool / str that refuse what Python's casts would silently accept (1.5 -> 1, 'False' -> True),
    and lists (kind=tuple, elements of kind `of`) given as a YAML/JSON list or a comma-separated string."""

    TRUE, FALSE = ('true', 'yes', 'on', '1'), ('false', 'no', 'off', '0')

    def __init__(self, kind, choices=None, low=None, high=None, of=None, length=None, increasing=False,
                 above=False):
        self.kind, self.choices, self.low, self.high = kind, choices, low, high
        self.of, self.length, self.increasing = of, length, increasing
        self.above = above  # low is excluded: the value must be > low (a PGD step of 0 moves nothing)

    def check(self, value):
        if self.kind is tuple:
            if isinstance(value, str):
                value = [part for part in value.split(',') if part.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            value = tuple(self._scalar(self.of, v) for v in value)
            if self.length is not None and len(value) != self.length:
                raise ValueError
            if self.increasing and list(value) != sorted(value):
                raise ValueError
            return value
        return self._scalar(self.kind, value)

    def _scalar(self, kind, v):
        v = self._convert(kind, v)
        if self.choices is not None and v not in self.choices:
            raise ValueError
        if self.low is not None and (v < self.low or self.above and v == self.low):
            raise ValueError
        if self.high is not None and v > self.high:
            raise ValueError
        return v

    @classmethod
    def _convert(cls, kind, v):
        if kind is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.strip().lower() in cls.TRUE + cls.FALSE:
                return v.strip().lower() in cls.TRUE
            raise ValueError
        if isinstance(v, bool):
            raise ValueError
        if kind is int:
            if isinstance(v, int):
                return v
            if isinstance(v, str):
                return int(v.strip())
            raise ValueError
        if kind is float:
            out = float(v) if isinstance(v, (int, float, str)) else None
            if out is None or not math.isfinite(out):
                raise ValueError
            return out
        if not isinstance(v, (str, int, float)):
            raise ValueError
        return str(v)

    def help(self):
        text = {bool: 'true/false', int: 'an int', float: 'a float', str: 'a string'}.get(self.kind)
        if self.choices is not None:
            text = 'one of ' + ', '.join(map(str, self.choices))
        if self.low is not None or self.high is not None:
            text = (f"{text or ''} in {'(' if self.above else '['}{'' if self.low is None else self.low}, "
                    f"{'' if self.high is None else self.high}]")
        if self.kind is tuple:  # the limits above apply to each element
            count = f'{self.length} ' if self.length else ''
            element = {int: 'int', float: 'number'}[self.of]
            text = (f'a list of {count}{element}s (comma separated or a YAML list)'
                    + (', increasing' if self.increasing else '') + (f', each{text}' if text else ''))
        return text


class Rule(Strict):
    """A string that must also pass `test` (a rule no list of choices can state); `text` is its help."""

    def __init__(self, test, text):
        super().__init__(str)
        self.test, self.text = test, text

    def check(self, value):
        value = super().check(value)
        if not self.test(value):
            raise ValueError
        return value

    def help(self):
        return self.text


def is_folder_name(name):
    """'' (the default name) or one path component: never '.', '..', a separator, a NUL or an absolute path, which
    would put the run folder (and what output.overwrite deletes) outside output.dir."""
    return name == '' or (name not in ('.', '..') and not os.path.isabs(name)
                          and not any(c in name for c in ('/', '\0', os.sep, os.altsep or '/')))


def P(kind, default, desc, **limits):
    return Param(Strict(kind, **limits), desc, default=default)


class Names(Strict):
    """A list of distinct names, each one of `choices` (Strict's own lists hold numbers), given as a YAML list or a
    comma-separated string; kept in the given order."""

    def __init__(self, choices):
        super().__init__(tuple, of=str, choices=tuple(choices))

    def check(self, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(',') if part.strip()]
        value = super().check(value)
        if len(set(value)) != len(value):
            raise ValueError
        return value

    def help(self):
        return f"a list of distinct names (comma separated or a YAML list), each one of {', '.join(self.choices)}"
