"""Read YAML and JSON files the way ansible-core's data loader does.

Like ansible, a file is first tried as JSON and then as YAML (YAML 1.1 rules
of PyYAML's safe loader: ``yes`` is a boolean, ``0755`` an octal number).
On top of the safe loader we understand ansible's own tags: ``!unsafe``
(strings that must never be templated) and ``!vault`` (encrypted strings,
kept encrypted).  Mappings remember the line of each key so that errors can
point at the line where a variable was set.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Hashable
from typing import Any

import yaml

from ._errors import InventoryError, Origin

__all__ = ["LinedDict", "UnsafeStr", "VaultStr", "load_data", "load_data_file"]

try:  # the libyaml parser is much faster; fall back to pure Python when absent
    _BaseLoader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - depends on how pyyaml was built
    _BaseLoader = yaml.SafeLoader


class UnsafeStr(str):
    """A string tagged ``!unsafe``: ansible never templates it.

    ``ansible-inventory --list`` prints such values as
    ``{"__ansible_unsafe": "..."}``; so does :meth:`Inventory.to_ansible_list`.
    """

    __slots__ = ()


class VaultStr(str):
    """An ansible-vault encrypted string; the ``str`` value is the ciphertext."""

    __slots__ = ()


class LinedDict(dict):  # type: ignore[type-arg]
    """A ``dict`` that also knows the 1-based source line of each key."""

    __slots__ = ("lines",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> LinedDict:
        new = LinedDict((copy.deepcopy(k, memo), copy.deepcopy(v, memo)) for k, v in self.items())
        new.lines = dict(self.lines)
        return new


def mark_unsafe(value: Any) -> Any:
    """Return a copy of ``value`` where every string value is an :class:`UnsafeStr`."""
    if isinstance(value, VaultStr):
        return value
    if isinstance(value, str):
        return UnsafeStr(value)
    if isinstance(value, LinedDict):
        new = LinedDict((k, mark_unsafe(v)) for k, v in value.items())
        new.lines = dict(value.lines)
        return new
    if isinstance(value, dict):
        return {k: mark_unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mark_unsafe(v) for v in value]
    return value


class _AnsibleLikeLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe YAML loader plus ansible's tags, line tracking and duplicate-key warnings."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[tuple[Any, int]] = []

    def construct_lined_map(self, node: yaml.MappingNode) -> Any:
        data = LinedDict()
        yield data
        # SafeConstructor.construct_mapping also flattens "<<" merge keys
        mapping = self.construct_mapping(node)
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue
            if key in seen:
                self.duplicate_keys.append((key, key_node.start_mark.line + 1))
            seen.add(key)
            data.lines[key] = key_node.start_mark.line + 1
        data.update(mapping)

    def construct_unsafe(self, node: yaml.Node) -> Any:
        return mark_unsafe(self._construct_untagged(node))

    def construct_vault(self, node: yaml.Node) -> Any:
        ciphertext = self._construct_untagged(node)
        if not isinstance(ciphertext, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"the {node.tag!r} tag requires a string value", node.start_mark
            )
        return VaultStr(ciphertext)

    def _construct_untagged(self, node: yaml.Node) -> Any:
        # build the value as if the tag were absent, like ansible does
        copied = copy.copy(node)
        copied.tag = self.resolve(type(node), node.value, (True, False))
        return self.construct_object(copied, deep=True)


_AnsibleLikeLoader.add_constructor("tag:yaml.org,2002:map", _AnsibleLikeLoader.construct_lined_map)
_AnsibleLikeLoader.add_constructor("tag:yaml.org,2002:python/dict", _AnsibleLikeLoader.construct_lined_map)
_AnsibleLikeLoader.add_constructor("tag:yaml.org,2002:python/unicode", _AnsibleLikeLoader.construct_yaml_str)
_AnsibleLikeLoader.add_constructor("!unsafe", _AnsibleLikeLoader.construct_unsafe)
_AnsibleLikeLoader.add_constructor("!vault", _AnsibleLikeLoader.construct_vault)
_AnsibleLikeLoader.add_constructor("!vault-encrypted", _AnsibleLikeLoader.construct_vault)


class _NotAnsibleJson(Exception):
    """JSON that ansible's decoder rejects, so the YAML parser gets a chance."""


def _json_object(pairs: list[tuple[str, Any]]) -> Any:
    obj = LinedDict(pairs)
    # ansible's legacy JSON profile turns these marker objects back into values
    if "__ansible_unsafe" in obj:
        value = obj["__ansible_unsafe"]
        if type(value) is not str:
            raise _NotAnsibleJson
        return UnsafeStr(value)
    if "__ansible_vault" in obj:
        value = obj["__ansible_vault"]
        if type(value) is not str:
            raise _NotAnsibleJson
        return VaultStr(value)
    return obj


def load_data(text: str, origin_file: str, warnings: list[str] | None = None) -> Any:
    """Parse JSON or YAML text like ansible's ``from_yaml``.

    Parameters
    ----------
    text
        File content.
    origin_file
        File name used in error messages.
    warnings
        If given, duplicate mapping keys are reported into this list.

    Returns
    -------
    Any
        The parsed document; mappings are :class:`LinedDict`.

    Raises
    ------
    InventoryError
        On a YAML syntax error, with the file and line.
    """
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except (ValueError, _NotAnsibleJson, RecursionError):
        pass
    loader = _AnsibleLikeLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        line = mark.line + 1 if mark is not None else None
        raise InventoryError(
            f"YAML syntax error: {problem}; fix the indentation or quoting near this line",
            Origin(origin_file, line),
        ) from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"YAML error: {exc}; fix the file", Origin(origin_file)) from exc
    finally:
        loader.dispose()
    if warnings is not None:
        for key, line in loader.duplicate_keys:
            warnings.append(f"{origin_file}:{line}: duplicate key {key!r}, the last value is used")
    return data


def load_data_file(path: str, shown_as: str | None = None, warnings: list[str] | None = None) -> Any:
    """Read and parse a JSON or YAML file.

    Parameters
    ----------
    path
        File to read.
    shown_as
        Name to use for the file in messages (defaults to ``path``).
    warnings
        Optional list collecting non-fatal problems.

    Returns
    -------
    Any
        The parsed document.

    Raises
    ------
    InventoryError
        If the file cannot be read, is not UTF-8 or is not valid YAML/JSON.
    """
    name = shown_as or path
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise InventoryError(f"file is not valid UTF-8 ({exc.reason}); save it as UTF-8", Origin(name)) from exc
    except OSError as exc:
        raise InventoryError(
            f"cannot read file: {exc.strerror}; check that it exists and is readable", Origin(name)
        ) from exc
    return load_data(text, name, warnings)
