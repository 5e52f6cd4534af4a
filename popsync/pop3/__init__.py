"""The sans-I/O POP3 client core: no sockets, no TLS, no clocks, no logging.

Commands become bytes (:mod:`.commands`), bytes become events
(:mod:`.events`), and :class:`Connection` keeps the state machine and the FIFO
of outstanding commands.  Pure helpers parse listings and capabilities
(:mod:`.listing`) and build authentication payloads (:mod:`.auth`).
"""

from popsync.pop3.commands import (
    Apop,
    Auth,
    AuthResponse,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    Utf8,
)
from popsync.pop3.connection import Connection, State
from popsync.pop3.events import (
    NEED_DATA,
    BodyData,
    CapaListing,
    Challenge,
    ConnectionClosed,
    EndOfBody,
    Err,
    Event,
    Greeting,
    Listing,
    NeedData,
    Ok,
    ScanListing,
    UidListing,
)

__all__ = [
    "NEED_DATA",
    "Apop",
    "Auth",
    "AuthResponse",
    "BodyData",
    "Capa",
    "CapaListing",
    "Challenge",
    "Command",
    "Connection",
    "ConnectionClosed",
    "Dele",
    "EndOfBody",
    "Err",
    "Event",
    "Greeting",
    "List",
    "Listing",
    "NeedData",
    "Noop",
    "Ok",
    "Pass",
    "Quit",
    "Retr",
    "Rset",
    "ScanListing",
    "Stat",
    "State",
    "Stls",
    "Top",
    "UidListing",
    "Uidl",
    "User",
    "Utf8",
]
