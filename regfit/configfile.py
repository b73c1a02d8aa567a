"""YAML files read strictly: UTF-8 text, not empty, no key given twice in one mapping.

PyYAML (and so jsonargparse) silently keeps the last of two equal keys, decodes with
whatever codec fails first, and reads an empty file as ``None``; each of those turns a
mistake in a file into a wrong run or an error that names no file. :func:`read_yaml`
reports them as one paragraph naming the file, the line and the fix, before the file is
used, e.g. ``my.yaml line 3: key 'lr' is given twice in one mapping (first on line 2)``.
``regfit fit|validate|test|predict|groups`` check every ``--config`` file with
:func:`check_config_files`; ``regfit sweep`` reads its file with :func:`read_yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from regfit.errors import UsageError, config_files

__all__ = ["read_yaml", "check_config_files"]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML 1.2 forbids it)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)  # resolves `<<:` merges first: a merged key may be overridden
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key; SafeLoader reports it itself
            continue
        if first != key_node.start_mark.line + 1:
            raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


def read_yaml(path: str | os.PathLike[str], what: str = "config", example: str = "configs/mnist_l2.yaml") -> Any:
    """The parsed YAML of ``path``; a file that is not UTF-8, empty, not YAML, or gives a key
    twice is a :class:`~regfit.errors.UsageError` naming the file (``what`` names its role)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} file {path} does not exist (relative paths start from {os.getcwd()}).") from None
    except IsADirectoryError:
        raise UsageError(f"{what} file {path} is a folder; give a YAML file, e.g. {example}.") from None
    except OSError as exc:
        raise UsageError(f"{what} file {path} cannot be read: {exc.strerror}.") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UsageError(f"{what} file {path} is UTF-16 text, not UTF-8: save it as UTF-8 "
                         f"(e.g. `iconv -f utf-16 -t utf-8 {path.name} > fixed.yaml`).")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"{what} file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): save it as UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.yaml`)."
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise UsageError(
            f"{path} line {exc.again}: key {exc.key!r} is given twice in one mapping (first on line {exc.first}); "
            "YAML would silently keep the last one. Remove one of them."
        ) from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None or data == {}:
        raise UsageError(f"{what} file {path} is empty; it needs at least its sections, e.g. like {example}.")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line: where, and what it found (without its source excerpt)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


# Sections read as objects of their own: a list or a number there is a mistake in the file.
_MAPPING_SECTIONS = ("trainer", "regularization")
_OBJECT_SECTIONS = ("model", "data", "optimizer", "lr_scheduler")


def check_config_files(argv: Sequence[str]) -> None:
    """Read every ``--config`` file of ``argv`` strictly (see :func:`read_yaml`); a file that
    does not exist is left to the parser, which names it. Each must be a mapping."""
    for name in config_files(argv):
        if not Path(name).exists():
            continue
        data = read_yaml(name)
        if not isinstance(data, dict):
            raise UsageError(
                f"config file {name} holds a {type(data).__name__}, not a mapping of sections "
                "(model:, data:, regularization:, optimizer:, trainer:), e.g. like configs/mnist_l2.yaml."
            )
        for section, value in data.items():
            if value is None:
                continue
            if section in _MAPPING_SECTIONS and not isinstance(value, dict) or (
                    section in _OBJECT_SECTIONS and not isinstance(value, (dict, str))):
                raise UsageError(
                    f"config file {name}: section {section}: holds a {type(value).__name__}, not a mapping of its "
                    f"options (e.g. `{section}:` followed by indented `key: value` lines, as in configs/mnist_l2.yaml)."
                )
