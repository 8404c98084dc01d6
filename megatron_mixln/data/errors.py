"""The one exception type for data a user can fix (missing, empty or malformed files, unusable tokenizers)."""


class DataError(ValueError):
    """A data problem a user can fix; the message is one sentence naming the file (and line) and what is expected."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message, to quote inside a one-sentence DataError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
