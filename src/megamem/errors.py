"""The one error type megamem raises for bad input or a bad store; the CLI prints it as one line."""


class MegamemError(ValueError):
    """A user-facing problem: the message names what is wrong and nothing was changed."""
