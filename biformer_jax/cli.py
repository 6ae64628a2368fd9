"""What the entry points (train.py, eval.py, sweep.py) share: flag parsing that fails in one line."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad `--config.<field>` override reported in one line, no traceback.

    ml_collections raises AttributeError / KeyError / TypeError / ValueError for an unknown field or
    a value of the wrong type while absl parses the flags; absl only catches its own flags.Error.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nPass --help to see the flags.", file=sys.stderr, flush=True)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        message = " ".join(str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").split())
        print(
            f"error: a --config override does not fit the config ({message}); overrides given: {' '.join(bad)}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
