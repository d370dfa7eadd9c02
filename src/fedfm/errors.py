"""Errors a user can act on. The CLI prints them in one line and exits with status 2."""


class FedfmError(Exception):
    """Bad input: names the field or file and what was expected."""

    exit_code = 2


class ConfigError(FedfmError):
    """A run config that cannot be run (caught before any model loads)."""


class DataError(FedfmError):
    """A data source that is missing, malformed or unusable."""


class ModelError(FedfmError):
    """A model that cannot be resolved or loaded."""


class DiskFull(FedfmError):
    """The disk filled up while fedfm wrote a file of a run: the message names the file and how to go on; what was
    written before (the last checkpoint, the adapter) stays valid."""


class UpdateRejected(Exception):
    """A client update that failed validation; the client drops out of the round."""


class ClientFailure(FedfmError):
    """Every client of a round raised an exception before anything was ever aggregated: a bug or a broken setup,
    not a straggler, so the run stops instead of spending its rounds on nothing."""

    exit_code = 1
