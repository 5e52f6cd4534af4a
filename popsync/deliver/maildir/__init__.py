"""Delivery into a Maildir (maildir(5)): durable, exactly once, safe from other users.

The modules, each one idea:

* :mod:`~popsync.deliver.maildir.names` -- the deterministic, path-safe names
  popsync gives messages (:func:`unique_name`, :func:`delivery_hash`,
  :func:`name_hash`);
* :mod:`~popsync.deliver.maildir.files` -- opening files without following
  links or blocking, and digests (:func:`file_digest`);
* :mod:`~popsync.deliver.maildir.tmp` -- one message written into ``tmp/``
  (:class:`TmpMessage`): write, fsync, close, and the link of that very file;
* :mod:`~popsync.deliver.maildir.store` -- the Maildir itself
  (:class:`Maildir`, :class:`MaildirIndex`): opening it safely, idempotent
  delivery into ``new/``, recovery look-ups, sweeping ``tmp/``;
* :mod:`~popsync.deliver.maildir.paths` -- opening the Maildir as root
  through root's symlinks only;
* :mod:`~popsync.deliver.maildir.mounts` -- network file-system detection;
* :mod:`~popsync.deliver.maildir.pipeline` -- creates and fsyncs on a thread
  pool, overlapping the disk with the network (:class:`DeliveryPipeline`);
* :mod:`~popsync.deliver.maildir.errors` -- :class:`DeliveryConflict`,
  :class:`UnsafeMaildir`;
* :mod:`~popsync.deliver.maildir.target` -- all of it as a delivery target
  (:class:`MaildirTarget`, :func:`open_maildir_target`; see
  :mod:`popsync.deliver.base`).
"""

from popsync.deliver.maildir.errors import DeliveryConflict, UnsafeMaildir
from popsync.deliver.maildir.files import file_digest
from popsync.deliver.maildir.names import delivery_hash, name_hash, unique_name
from popsync.deliver.maildir.pipeline import WORKERS, DeliveryPipeline
from popsync.deliver.maildir.store import Maildir, MaildirIndex
from popsync.deliver.maildir.target import MaildirTarget, open_maildir_target
from popsync.deliver.maildir.tmp import TmpMessage

__all__ = [
    "WORKERS",
    "DeliveryConflict",
    "DeliveryPipeline",
    "Maildir",
    "MaildirIndex",
    "MaildirTarget",
    "TmpMessage",
    "UnsafeMaildir",
    "delivery_hash",
    "file_digest",
    "name_hash",
    "open_maildir_target",
    "unique_name",
]
