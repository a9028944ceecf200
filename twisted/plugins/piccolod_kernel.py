"""
Drop-in plugins of piccolod itself: the ``piccolod`` twistd service maker and
the ``api`` subsystem.  (No ``__init__.py`` in ``twisted/plugins``: it is a
namespace drop-in directory.)
"""


from twisted.application.service import ServiceMaker

from piccolod.kernel.plugins import SubsystemPlugin

piccolod = ServiceMaker(
    "piccolod",
    "piccolod.tap",
    "The piccolod control-plane daemon of a home-server appliance.",
    "piccolod",
)

apiHttp = SubsystemPlugin(
    slot="api",
    variant="http",
    description="The HTTP API on twisted.web: auth, policy, storage, commands, SSE, OpenAPI",
    factory="piccolod.api.service.APIService.from_context",
    # Named, not imported: plugin discovery imports no subsystem.
    config_keys="piccolod.api.service.CONFIG_DEFAULTS",
    default=True,
)
