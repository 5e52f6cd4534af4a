"""Delivery targets: where a fetched message is stored, one subpackage per kind.

Each target takes the bytes of one message exactly as the sync hands them
over and reports, on the caller's thread, either that they are durably
stored or a :class:`popsync.errors.DeliveryError`. Today there is one target,
:mod:`popsync.deliver.maildir`; mbox, an external MDA, LMTP and IMAP will
live beside it.
"""
