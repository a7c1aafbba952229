"""The command line every script shares: numbers checked against their range where the flag is
parsed, each default said once in the help, and one `error:` line for a mistake."""
import argparse
import math
import os
import sys


def number(kind=float, low=None, high=None, low_open=False, allow_inf=False):
    """An argparse `type` for a number in [low, high] ((low, high] with
    low_open); NaN is refused, and infinity unless `allow_inf`. A bad value
    becomes argparse's one-line error naming the flag and the allowed range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got '{text}'") from None
        if kind is float and (math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0))):
            raise argparse.ArgumentTypeError(f"'{text}' is not allowed: {describe()}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high and not (allow_inf and math.isinf(value))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {describe()}")
        return value

    def describe():
        def show(v):
            return str(int(v)) if float(v).is_integer() else f"{v:g}"
        lo = "" if low is None else f"{'>' if low_open else '>='} {show(low)}"
        hi = "" if high is None else f"<= {show(high)}"
        rng = " and ".join(s for s in (lo, hi) if s)
        return f"{'a whole number' if kind is int else 'a number'} {rng}" + (" or inf" if allow_inf else "")
    parse.__name__ = "int" if kind is int else "float"
    return parse


def show_default(name, value):
    """A default as a user types it: --x / --no-x for a switch, inf, words for lists."""
    if isinstance(value, bool):
        return name if value else "--no-" + name[2:]
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def add_flag(group, name, default, help, default_text=None, **kw):
    """Adds a flag whose help ends with its default, said once in the form a user types it (or
    `default_text`); a boolean default makes a --x / --no-x switch, unless it is a store_true."""
    if isinstance(default, bool):
        kw.setdefault("action", argparse.BooleanOptionalAction)
    action = group.add_argument(name, default=default, **kw)
    shown = default_text or ("off" if kw.get("action") == "store_true" else show_default(name, default))
    action.help = f"{help} (default: {shown})".replace("%", "%%")  # argparse formats help with %
    return action


def one_line_errors(parser, script):
    """Argument mistakes give one `error:` line (exit 2) instead of the usage dump."""
    def error(message):
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun the first process says it
            sys.stderr.write(f"error: {message} (see python {script} --help)\n")
        sys.exit(2)
    parser.error = error
    return parser

