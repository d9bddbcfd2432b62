"""User-facing errors: raised at the boundary (config, data, files) and printed without a traceback."""


class LossLabError(Exception):
    """An error caused by the user's input or environment; the CLI prints its message and exits 2."""


class ConfigError(LossLabError):
    """An invalid config value or an incompatible combination of choices."""


class DataNotFoundError(LossLabError):
    """A dataset's files are in none of the searched places and could not be downloaded."""


class DataFormatError(LossLabError):
    """A dataset file exists but is truncated, corrupt or has unexpected contents."""


class NonFiniteLossError(LossLabError):
    """A training step's loss or gradient was NaN or infinite (``non_finite=stop``); the message names the epoch,
    step, batch and the values of the loss terms."""


class OutputWriteError(LossLabError):
    """Writing a run's files failed (disk full, quota, read-only); the message names the file."""
