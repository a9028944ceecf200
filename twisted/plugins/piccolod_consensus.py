"""
Drop-in plugins of the ``consensus`` slot.  (No ``__init__.py`` in
``twisted/plugins``: it is a namespace drop-in directory.)
"""

from piccolod.interfaces import IConsensus
from piccolod.kernel.plugins import SubsystemPlugin

singleNode = SubsystemPlugin(
    slot="consensus",
    variant="single-node",
    description="One node that leads every resource it tracks (control-plane, app:<name>)",
    factory="piccolod.consensus.single_node.SingleNodeConsensus.from_context",
    provides=(IConsensus,),
    requires=(),
    config_keys={"resources": []},
    default=True,
)

etcd = SubsystemPlugin(
    slot="consensus",
    variant="etcd",
    description=(
        "Leadership per resource on an etcd cluster (lease + create-if-absent on its JSON "
        "gateway), fenced by the leader key's create revision"
    ),
    factory="piccolod.consensus.etcd.EtcdConsensus.from_context",
    provides=(IConsensus,),
    requires=(),
    config_keys={
        "endpoints": ["http://127.0.0.1:2379"],
        "prefix": "/piccolod",
        "ttl": 5,
        "renew_deadline": 3.0,
        "retry_period": 0.5,
        "request_timeout": 1.0,
        "resources": [],
    },
)
