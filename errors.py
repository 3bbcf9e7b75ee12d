"""The errors a user can fix: bad settings, missing or damaged inputs. One base class, `IqaError`;
`iqa` (cli.py) turns each into one `error:` line in one place.

A message names a setting by its keyword in backticks, `micro_batch`: from Python it reads as the
keyword (micro_batch), on the command line as the flag (--micro-batch). Imports nothing of iqa, so
every layer may raise these.
"""

import re
from typing import Callable

SETTING = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)*)`")  # one word in backticks; a quoted command has spaces


class IqaError(Exception):
    """A problem with what the user gave, as one line naming the cause and the fix."""

    def phrased(self, setting: Callable[[str], str]) -> str:
        """The message with each `setting` written by `setting(keyword)`."""
        text = super().__str__()
        return SETTING.sub(lambda match: setting(match.group(1)), text)

    def __str__(self) -> str:
        return self.phrased(lambda keyword: keyword)


class SettingError(IqaError, ValueError):
    """A setting given a value it cannot take, or two settings that do not go together."""


class ExistsError(IqaError, FileExistsError):
    """A folder the command would replace: iqa replaces only what it built, and only when told to."""
