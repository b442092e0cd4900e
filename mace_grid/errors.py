"""User-facing errors: entry points print them as one line and exit non-zero (no traceback)."""


class MaceGridError(Exception):
    """Base class of errors caused by the user's config or data, not by a bug."""


class ConfigError(MaceGridError):
    """The composed config is invalid; the message says what to change."""


class DataError(MaceGridError):
    """A data file is missing, empty, or lacks what training needs."""


class DivergedError(MaceGridError):
    """Training produced a non-finite loss: the run stops before such a model can be saved."""
