"""popsync: a POP3 mail sync daemon that fetches only what is new, exactly once."""

__version__ = "0.1.0"
