"""A plugin package outside piccolod/ holding a variant for a new slot."""

from piccolod.kernel.plugins import SubsystemPlugin
from tests.thirdparty import IEcho

echoLoud = SubsystemPlugin(
    slot="echo",
    variant="loud",
    description="Says hello loudly",
    factory="tests.thirdparty.EchoService.from_context",
    provides=(IEcho,),
    config_keys={"greeting": "HELLO"},
)
