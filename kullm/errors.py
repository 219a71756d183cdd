"""The one base of kullm's own errors.

Every error kullm raises on purpose (a bad config value, an unusable data set, a refused adapter folder, a judge
that keeps failing…) derives from :class:`KullmError`, so a command line shows it as one ``<prog>: <message>`` line
(``kullm.cli``) while any other exception, a bug, keeps its traceback. Types that were ``ValueError`` or
``RuntimeError`` before keep that base too: ``except ValueError`` around kullm's API still catches them.
"""

from __future__ import annotations


class KullmError(Exception):
    """An error whose message says what to change (a key, a path, a value); shown to users without a traceback."""
