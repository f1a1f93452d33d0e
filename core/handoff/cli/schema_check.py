"""`handoff enqueue` without --app: check a payload against the schema the agent's workers
published, so a typo is refused at the shell instead of dead-lettered at the worker.

JSON Schema validation is jsonschema's (the `pydantic` extra brings it): without it, or
without a published schema, the command says in one line that it could not check.
"""

from __future__ import annotations

from typing import Any

import click

from handoff.errors import InvalidPayload


class PublishedSchemaCheck:
    """One agent's published schema, checked against each payload of one command."""

    def __init__(self, agent: str, schema: dict[str, Any] | None) -> None:
        self.agent = agent
        self.validator: Any = None
        if schema is None:
            return
        try:
            from jsonschema import Draft202012Validator
        except ImportError:
            click.echo(
                f"handoff: could not check the payload against {agent}'s published schema: "
                "jsonschema is not installed (pip install 'handoff[pydantic]')",
                err=True,
            )
            return
        self.validator = Draft202012Validator(schema)

    def check(self, payload: Any, where: str = "PAYLOAD") -> None:
        """InvalidPayload (one line, naming the field) when the payload does not match."""
        if self.validator is None:
            return
        from jsonschema.exceptions import best_match

        error = best_match(self.validator.iter_errors(payload))
        if error is None:
            return
        field = ".".join(str(p) for p in error.absolute_path) or "(the payload)"
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        raise InvalidPayload(
            f"{where}: does not match {self.agent}'s published schema: {field}: {message}"
        )
