"""Ledger schema revisions, oldest first; ids are zero-padded sequence numbers."""
