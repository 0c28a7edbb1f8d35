"""Errors that scalora reports to the user."""


class ScaloraError(Exception):
    """A user mistake, reported without a traceback."""


class ConfigError(ScaloraError, ValueError):
    """An invalid `LoraConfig` field or an adapter that does not fit the model."""


class AdapterFileError(ScaloraError):
    """A missing, corrupt or mismatching adapter file."""


class DataError(ScaloraError):
    """Training or evaluation data is missing or malformed; the message names the file and line."""
