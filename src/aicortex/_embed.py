"""Embeddings: the typed result, and the pure parts of batching (splitting a list of
texts into batches, and putting the answers back together in input order)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._events import Stats
from ._exceptions import ValidationError
from ._health import unique

__all__ = ["Batch", "EmbedResult", "assemble", "split_batches"]


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """The answer of :meth:`AsyncCortex.embed`.

    ``embeddings`` holds one vector per input, in input order. ``servers`` are the
    servers that answered, in the order of the first batch each one served.
    ``prompt_tokens`` is the tokens of every input together; ``total_duration`` and
    ``load_duration`` add up the servers' own timings of each batch (integer
    nanoseconds), so with batches served side by side they exceed the wall-clock time.
    A figure no server reported is ``None``.
    """

    embeddings: list[list[float]]
    model: str
    servers: tuple[str, ...]
    batches: int
    prompt_tokens: int | None = None
    total_duration: int | None = None
    load_duration: int | None = None

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch's answer: its vectors, who served it, and its figures."""

    start: int  # the position of its first input
    vectors: list[list[float]]
    server: str
    stats: Stats


def split_batches(texts: Sequence[str], size: int) -> list[tuple[int, list[str]]]:
    """``texts`` in batches of at most ``size``, each with the position of its first text."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValidationError(f"batch_size must be a whole number >= 1, not {size!r}.")
    return [(start, list(texts[start : start + size])) for start in range(0, len(texts), size)]


def assemble(model: str, batches: Sequence[Batch], count: int) -> EmbedResult:
    """Every batch's vectors in input order (``count`` in all), and their figures added up."""
    ordered = sorted(batches, key=lambda b: b.start)
    vectors: list[list[float]] = []
    for batch in ordered:
        if batch.start != len(vectors):
            raise ValueError(f"batches do not cover the inputs at position {len(vectors)}")
        vectors.extend(batch.vectors)
    if len(vectors) != count:
        raise ValueError(f"{len(vectors)} embeddings for {count} inputs")
    return EmbedResult(
        embeddings=vectors,
        model=model,
        servers=tuple(unique(b.server for b in ordered)),
        batches=len(ordered),
        prompt_tokens=_sum([b.stats.prompt_tokens for b in ordered]),
        total_duration=_sum([b.stats.total_duration for b in ordered]),
        load_duration=_sum([b.stats.load_duration for b in ordered]),
    )


def _sum(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
