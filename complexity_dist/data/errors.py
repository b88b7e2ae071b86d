"""The one error type of the data package."""


class DataError(ValueError):
    """A dataset problem the user can fix: the message names the file or value at fault and the fix."""
