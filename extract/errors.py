"""The error a backbone load raises, apart from the loaders so every family's module can raise it."""

from iqa.errors import IqaError


class BackboneLoadError(IqaError, RuntimeError):
    """Weights could not be loaded; the message is one line meant for the user."""
