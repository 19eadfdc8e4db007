"""``python -m tests.fuzz TARGET [--seconds N] [--corpus DIR]``: run one atheris target.

The corpus directory (default ``.fuzz-corpus/TARGET``, not committed) is seeded with valid
inputs from :func:`tests.fuzz.targets.seeds`; libFuzzer keeps what it finds interesting
there. A crash writes ``crash-*`` into the current directory and exits non-zero: turn it
into a regression test (tests/test_fuzz_regressions.py) before fixing the decoder.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def main() -> None:
    import atheris

    # Coverage feedback from our own decoders only: instrumenting every loaded module
    # (trio, cryptography's Python parts...) takes minutes and guides nothing.
    with atheris.instrument_imports(include=["p2pimage"]):
        from tests.fuzz.targets import TARGETS, seeds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--seconds", type=int, default=60, help="time limit (default 60)")
    parser.add_argument("--corpus", type=Path, help="corpus directory")
    parser.add_argument("--timeout", type=int, default=5, help="seconds per input: a hang")
    args = parser.parse_args()
    corpus = args.corpus or Path(".fuzz-corpus") / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds(args.target):
        (corpus / hashlib.sha256(seed).hexdigest()[:16]).write_bytes(seed)

    target = TARGETS[args.target]
    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={args.seconds}",
        f"-timeout={args.timeout}",
        "-max_len=65536",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
