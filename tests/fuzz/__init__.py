"""Coverage-guided fuzzing of the decoders (atheris): ``python -m tests.fuzz TARGET``.

Not collected by pytest. See docs/testing.md for the targets, how long each ran and what
it found; a crash or hang found becomes a regression test beside the decoder's tests.
"""
