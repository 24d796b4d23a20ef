"""Errors that carry a message meant for the user (printed without a traceback by the CLI)."""


class UserError(Exception):
    """Bad input from a user: config, data path, checkpoint, impossible shapes or budgets."""


class ProtocolError(ValueError):
    """A message on the wire (or handed to the codec) is malformed, oversized or inconsistent."""
