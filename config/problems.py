"""How configuration problems are told to an operator: which file and line, which name, what to do.

Shared by the service settings (`FILEFEED_CONFIG`) and the embedded feeds file (`FILEFEED_FEEDS`), so both say a
TOML syntax error, a missing file or a misspelt name the same way, in one line each.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_TOML_WHERE = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


class ConfigFileError(ValueError):
    """A configuration file that cannot be used at all: missing, unreadable, not TOML. The message is one line."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean file_format?)' for the closest known name, or '' when nothing is close."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:  # a case or prefix slip (staging_dir for FILEFEED_STAGING_DIR) is still worth a hint
        folded = {k.lower().removeprefix("filefeed_"): k for k in known}
        hit = folded.get(name.lower().removeprefix("filefeed_"))
        close = [hit] if hit else []
    return f" (did you mean {close[0]}?)" if close else ""


def read_toml(path: Path | str, setting: str) -> dict[str, Any]:
    """The TOML document at `path`, named by the setting `setting`; ConfigFileError says where and how to fix."""
    where = f"{setting}={path}"
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"{where}: no such file (point {setting} at an existing TOML file, or unset it)") \
            from None
    except IsADirectoryError:
        raise ConfigFileError(f"{where}: is a folder, not a TOML file") from None
    except OSError as e:
        raise ConfigFileError(f"{where}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        m = _TOML_WHERE.match(str(e))
        if m:
            raise ConfigFileError(f"{path}:{m['line']}:{m['col']}: TOML syntax error: {m['msg']} "
                                  f"(the file named by {setting}; fix that line)") from None
        raise ConfigFileError(f"{where}: TOML syntax error: {e}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"{where}: not UTF-8 text") from None
