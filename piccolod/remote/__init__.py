"""
The ``remote`` subsystem: remote access through reverse tunnels, with ACME
certificates and TLS termination on the device.

- :mod:`piccolod.remote.manager`: the ``remote`` slot's service
  (:class:`~piccolod.remote.manager.RemoteManager`, ``IRemoteManager``);
- :mod:`piccolod.remote.stub` and :mod:`piccolod.remote.ssh`: the
  ``tunnel`` slot's adapters (``ITunnel``);
- :mod:`piccolod.remote.routes`, :mod:`piccolod.remote.model`: the route
  table and the stored record; :mod:`piccolod.remote.acme`,
  :mod:`piccolod.remote.tls`, :mod:`piccolod.remote.keys`: certificates.

Modules are imported on use (twisted.conch and the ``acme`` library are
heavy, and conch must not be imported before ``twistd`` installs its
reactor); see ``docs/remote.md``.
"""
