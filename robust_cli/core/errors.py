class UserError(Exception):
    """Bad user input: the CLI prints the message on one line and exits 2."""
