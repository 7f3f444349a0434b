"""Read-only mapping access to the library's records, for code that treats them as dicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["RecordMapping", "plain"]


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: records become dicts, tuples become lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]  # pyright: ignore[reportUnknownVariableType]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}  # pyright: ignore[reportUnknownVariableType]
    return value


class RecordMapping(Mapping[str, Any]):
    """A frozen dataclass that is also a read-only mapping of its JSON form.

    ``record["name"]``, ``record.get("name")``, ``"name" in record`` and
    ``dict(record)`` see the fields as :meth:`to_dict` gives them: nested records
    are dicts, so ``json.dumps(dict(record))`` works. The attributes stay the typed
    way in.
    """

    __slots__ = ()

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))  # pyright: ignore[reportArgumentType]

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return plain(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return {name: self[name] for name in self._names()}
