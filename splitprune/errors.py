"""Errors that carry a message meant for the user (printed without a traceback by the CLI)."""


class UserError(Exception):
    """Bad input from a user: config, data path, checkpoint, impossible shapes or budgets."""


class ProtocolError(ValueError):
    """A message on the wire (or handed to the codec) is malformed, oversized or inconsistent."""


def run_command(prog: str, args) -> int:
    """Run a parsed subcommand (`args.run(args)`) as a CLI does: a UserError is one line on stderr and exit 2,
    Ctrl-C exit 130; anything else is a bug and keeps its traceback."""
    import sys

    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130
