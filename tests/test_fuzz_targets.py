"""The fuzz targets (tests/fuzz) stay runnable: every seed is valid input for its decoder,
and a few thousand random mutations of it raise nothing but the decoder's own error.

The long coverage-guided runs are ``python -m tests.fuzz TARGET --seconds N`` (docs/testing.md).
"""

from __future__ import annotations

import random

import pytest

from tests.fuzz.targets import TARGETS, seeds


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_are_accepted(name: str) -> None:
    for seed in seeds(name):
        TARGETS[name](seed)  # raises on a decoder bug, not on garbage


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_seeds_raise_only_protocol_errors(name: str) -> None:
    rng = random.Random(name)
    for seed in seeds(name):
        for _ in range(300):
            data = bytearray(seed)
            for _ in range(rng.randint(1, 8)):
                op = rng.randrange(3)
                pos = rng.randrange(len(data) + 1)
                if op == 0 and data:
                    data[min(pos, len(data) - 1)] = rng.randrange(256)
                elif op == 1:
                    data[pos:pos] = bytes([rng.randrange(256)])
                else:
                    del data[pos : pos + rng.randint(1, 16)]
            TARGETS[name](bytes(data))
