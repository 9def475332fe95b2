"""The one exception type that the command line turns into a single readable error line."""


class FluxpipeError(Exception):
    """Bad input: the message names the file or setting, what is wrong and how to fix it."""


class CheckpointError(FluxpipeError):
    """A model file that cannot be used as given (format, keys, shapes, dtypes)."""


def summarize(items: list[str], limit: int = 8) -> str:
    """'a, b, c (+N more)' for error messages that list keys or files."""
    items = sorted(items)
    head = ", ".join(items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
