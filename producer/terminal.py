"""User-supplied text on a terminal: dataset, file and label names, errors, worker names.

Such text is shown as text. A rich markup tag in it (``[link=http://…]``, ``[red]``) stays visible instead of
becoming a live link or a colour, and a control character (an ANSI escape that clears the screen or recolours
what follows) is written as its escape (``\\x1b``) by ``segq.storage.printable``.
"""

from __future__ import annotations

from rich.text import Text

from segq.storage import printable


def text(value: object, style: str = "") -> Text:
    """``value`` as a rich cell or title: never parsed as markup, its control characters escaped."""
    return Text(printable("" if value is None else str(value)), style=style)


def line(value: object) -> str:
    """``value`` as a plain line (click.echo, a log): its control characters escaped."""
    return printable(str(value))
