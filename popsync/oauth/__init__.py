"""OAuth2 for POP3 (XOAUTH2, OAUTHBEARER): authorize once, then refresh unattended.

* :mod:`~popsync.oauth.presets` -- Google's and Microsoft's endpoints;
* :mod:`~popsync.oauth.tokens` -- the endpoints' JSON and the stored
  tokens, validated;
* :mod:`~popsync.oauth.http` -- one bounded HTTPS POST;
* :mod:`~popsync.oauth.client` -- the grants, built with Authlib;
* :mod:`~popsync.oauth.flows` -- ``popsync auth``: device and code flows;
* :mod:`~popsync.oauth.store` -- the keyring, else a 0600 file;
* :mod:`~popsync.oauth.access` -- a valid access token for each poll.

This package imports nothing at import time: the config reads the presets
whether or not the ``popsync[oauth]`` extra (Authlib) is installed.
"""
