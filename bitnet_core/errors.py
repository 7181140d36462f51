"""The one exception type the CLI turns into a single error line and a non-zero exit."""


class ConvertError(Exception):
    """Bad input or an impossible request, described in one line for the user.

    Raise it with the offending path in the message, e.g.
    ``ConvertError(f"{path}: packed weight holds the invalid code 3")``.
    """


class CorruptData(ConvertError):
    """Tensor bytes that no valid writer produces (invalid ternary code, non-finite multiplier ...)."""


class CheckFailed(ConvertError):
    """An integrity check (`inspect --check`) found the file changed: the command exits 1, not 2."""
