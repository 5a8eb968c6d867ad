"""The two data streams of stage 2: a labelled and an unlabelled loader iterated in lockstep."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class TwoStreamLoader:
    """Yields ``{"labelled": batch, "unlabelled": batch}`` pairs from two loaders.

    Both loaders should draw a fixed number of batches (a sampler with replacement), so an epoch is
    the same length whatever the sizes of the labelled and unlabelled sets; the pair stops with the
    shorter loader.
    """

    def __init__(self, labelled: Iterable, unlabelled: Iterable) -> None:
        self.labelled = labelled
        self.unlabelled = unlabelled

    def __len__(self) -> int:
        return min(len(self.labelled), len(self.unlabelled))

    def __iter__(self) -> Iterator[dict]:
        for labelled, unlabelled in zip(self.labelled, self.unlabelled, strict=False):
            yield {"labelled": labelled, "unlabelled": unlabelled}
