"""SIGINT and SIGTERM, remembered. Both raise where the process is (KeyboardInterrupt, or Terminated for SIGTERM),
so the same clean-up runs; and `received` keeps which one came, because a library may turn the exception raised
inside it into another error (seen: OmegaConf's clean-up, Hydra's `_locate` reporting a RecursionError). Whoever
reports an error asks `received` first: an interrupted run says so, not that a setting is wrong."""

import signal

received = None  # "Ctrl-C" or "SIGTERM" once one came; set for good


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the same clean-up as for Ctrl-C runs."""


def _raise(signum, frame):
    global received
    received = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    signal.signal(signal.SIGTERM, _raise)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the parent ignores Ctrl-C (nohup)
        signal.signal(signal.SIGINT, _raise)
