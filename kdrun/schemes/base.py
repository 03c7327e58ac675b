"""The scheme interface: a scheme decides who teaches whom and runs its stages through the trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdrun.run import RunContext


class Scheme:
    """``run(ctx) -> dict`` of summary entries (flat keys)."""

    name = "scheme"

    def __init__(self, name: str | None = None) -> None:
        if name:
            self.name = name

    def validate(self, cfg) -> None:
        """Reject a configuration this scheme cannot run, before anything trains."""

    def run(self, ctx: "RunContext") -> dict:
        raise NotImplementedError
