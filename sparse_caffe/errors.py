"""The one exception type for mistakes a user can fix; tasks turn it into one line and exit 1."""


class UserError(Exception):
    """Something is wrong with the input or the machine; the message says what and what to do."""
