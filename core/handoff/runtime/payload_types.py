"""Typed payloads and results: what an agent declares with `payload=` and `result=`.

Runs in: every process that loads the app (a producer checks at enqueue, a worker checks
at claim and before the ack). The types are pydantic models, or anything pydantic's
TypeAdapter accepts; pydantic is imported only when an agent declares a type (the
`handoff[pydantic]` extra), so untyped agents cost nothing and need nothing.

Both sides validate the same thing the same way: the JSON form (pydantic's JSON mode).
A worker only ever sees JSON (the task as stored), so a producer checks the JSON of what
it is given, and then the very data it stores, exactly as the worker will: a strict model
(ConfigDict(strict=True)) with datetime or UUID fields is accepted by both or by neither.

Every failure is one line naming the agent and the field: a pydantic ValidationError
prints a paragraph, which is cut down to its first error here.
"""

from __future__ import annotations

import typing
from typing import Any

import orjson

from handoff.errors import ConfigError, InvalidPayload


class TypedValue:
    """One declared type: validate to it, and turn it back into JSON-able data."""

    def __init__(self, agent: str, role: str, declared: Any) -> None:
        try:
            import pydantic
            import pydantic_core
        except ImportError:
            raise ConfigError(
                f"agent {agent!r}: {role}= needs pydantic: pip install 'handoff[pydantic]'"
            ) from None
        self.declared = declared
        self.role = role
        self.name = getattr(declared, "__name__", repr(declared))
        self._error = pydantic.ValidationError
        self._jsonable = pydantic_core.to_jsonable_python  # models, sets, ... for orjson
        model = isinstance(declared, type) and issubclass(declared, pydantic.BaseModel)
        self._model = declared if model else None
        try:
            self.adapter = pydantic.TypeAdapter(declared)
            self.adapter.json_schema()  # a type without a schema fails here, not later
        except Exception as e:  # pydantic's own errors are several kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"agent {agent!r}: {role}={self.name} is not a type pydantic can validate: {first}"
            ) from None

    def validate(self, value: Any) -> Any:
        """The value as the declared type (a model instance), validated in its JSON form
        (as it travels: a worker's payload is JSON), or ValueError in one line."""
        return self._check(value)[0]

    def to_data(self, value: Any) -> Any:
        """Validated, then as plain JSON-able data (what goes into Redis). A model instance
        was validated when made. A payload's data is checked as the worker will check it
        unless it is the very JSON just checked (a strict model's datetime, a serializer
        that does not round-trip: refused here, not at claim). A result has no consumer
        that validates it: it is checked once."""
        if self._model is not None and isinstance(value, self._model):
            model, checked = value, b""
        else:
            model, checked = self._check(value)
        data = self.adapter.dump_python(model, mode="json")
        if self.role == "payload":
            stored = orjson.dumps(data)
            if stored != checked:
                try:
                    self._check(stored, text=True)
                except ValueError as e:
                    raise ValueError(f"stored as {self.name}'s JSON, {e}") from None
        return data

    def _check(self, value: Any, *, text: bool = False) -> tuple[Any, bytes]:
        """(the validated value, the JSON text it was validated from)."""
        try:
            raw = value if text else orjson.dumps(value, default=self._jsonable)
        except (TypeError, ValueError) as e:  # orjson's, or what _jsonable could not turn
            raise ValueError(f"does not match {self.name}: not JSON-able: {e}") from None
        try:
            return self.adapter.validate_json(raw), raw
        except self._error as e:
            raise ValueError(f"does not match {self.name}: {one_line(e)}") from None

    def schema(self) -> dict[str, Any]:
        return self.adapter.json_schema()


def one_line(error: Any) -> str:
    """The first error of a pydantic ValidationError: its field path, message and input."""
    errors = error.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(the value itself)"
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"field {where!r}: {first['msg']} (got {got}){more}"


def mentions(declared: Any, kinds: tuple[type, ...]) -> bool:
    """True when a declared type is, or contains (list[X], X | None, ...), one of kinds."""
    if isinstance(declared, type) and issubclass(declared, kinds):
        return True
    return any(mentions(arg, kinds) for arg in typing.get_args(declared))


JSON_TYPES = frozenset({dict, list, str, int, float, bool, type(None)})


def plain(value: Any) -> Any:
    """A pydantic model given where no type is declared, as JSON-able data; else value.
    Plain JSON values (nearly every result, on the per-task path) return at once."""
    if type(value) in JSON_TYPES:
        return value
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


def payload_for(typed: TypedValue | None, agent: str, payload: Any) -> Any:
    """What a producer stores for `agent`: checked against its declared type when the app
    is loaded in this process; a model instance turned into data either way."""
    if typed is None:
        return plain(payload)
    try:
        return typed.to_data(payload)
    except ValueError as e:
        raise InvalidPayload(f"payload for agent {agent!r} {e}") from None
