"""Errors that describe bad user input; the CLI prints them as one line and exits non-zero."""


class RndpoError(ValueError):
    """A problem with the user's input (data, config, files) that names what and where."""


class DataError(RndpoError):
    """A data set, image or mask that cannot be used; the message names the case or file."""


class CheckpointError(RndpoError):
    """A checkpoint, bank or stage output that is missing, truncated, corrupted or unsafe."""
