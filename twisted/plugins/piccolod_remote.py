"""
Drop-in plugins of the remote subsystem.  (No ``__init__.py`` in
``twisted/plugins``: it is a namespace drop-in directory.)

- ``remote=manager`` (default): remote access configuration, routes by
  leadership, certificates (ACME) and TLS termination
  (:class:`piccolod.remote.manager.RemoteManager`); ``[subsystems.remote]``
  keys in :data:`piccolod.remote.model.CONFIG_KEYS`.
- ``tunnel=stub`` (default): records what would be exposed, connects to
  nothing.
- ``tunnel=ssh``: reverse tunnels with twisted.conch to OpenSSH servers;
  ``[subsystems.tunnel]`` keys in :data:`piccolod.remote.ssh.CONFIG_KEYS`.
"""

from piccolod.interfaces import IRemoteManager, ITunnel
from piccolod.kernel.plugins import SubsystemPlugin

remoteManager = SubsystemPlugin(
    slot="remote",
    variant="manager",
    description=(
        "Remote access: configuration in the control store, routes by leadership, "
        "ACME certificates and SNI TLS termination over the tunnel slot"
    ),
    factory="piccolod.remote.manager.RemoteManager.from_context",
    provides=(IRemoteManager,),
    requires=(ITunnel,),
    config_keys="piccolod.remote.model.CONFIG_KEYS",
    default=True,
)

tunnelStub = SubsystemPlugin(
    slot="tunnel",
    variant="stub",
    description="No tunnel: records what would be exposed, connects to nothing",
    factory="piccolod.remote.stub.StubTunnel.from_context",
    provides=(ITunnel,),
    config_keys={},
    default=True,
)

tunnelSsh = SubsystemPlugin(
    slot="tunnel",
    variant="ssh",
    description="Reverse tunnels (tcpip-forward) with twisted.conch to OpenSSH servers",
    factory="piccolod.remote.ssh.SSHTunnelService.from_context",
    provides=(ITunnel,),
    config_keys="piccolod.remote.ssh.CONFIG_KEYS",
)
