"""popsync's Alembic environment, shipped inside the wheel as ``popsync.migrations``.

popsync runs these itself on start (``popsync.ledger.upgrade``); the ``alembic``
command line works too, from the repository root (see ``alembic.ini`` there).
"""
