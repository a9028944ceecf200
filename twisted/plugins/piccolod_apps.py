"""
Drop-in plugins of the ``containers``, ``apps`` and ``services`` slots.
(No ``__init__.py`` in ``twisted/plugins``: it is a namespace drop-in
directory.)

- ``containers=podman`` (default): podman's REST API over its unix socket;
  spawns ``podman system service`` when nothing answers on the socket, and
  with ``fallback = "fake"`` (default) falls back LOUDLY (critical log,
  ``containers`` health at warn) to the in-memory fake when podman is not
  usable.  ``containers=fake``: the in-memory fake, on purpose.
- ``apps=controller`` (default): app commands, the app controller, lock and
  leadership policy.
- ``services=proxy`` (default): persisted ports, TCP/HTTP proxies, routes.
"""

from piccolod.interfaces import IContainerRuntime, IControlStore, IServiceManager
from piccolod.kernel.plugins import SubsystemPlugin

containersPodman = SubsystemPlugin(
    slot="containers",
    variant="podman",
    description="Podman over its REST socket (falls back loudly to fake when unusable)",
    factory="piccolod.apps.podman.PodmanContainers.from_context",
    provides=(IContainerRuntime,),
    config_keys="piccolod.apps.podman.CONFIG_KEYS",
    default=True,
)

containersFake = SubsystemPlugin(
    slot="containers",
    variant="fake",
    description="In-memory stand-in: apps do not really run (tests, machines without podman)",
    factory="piccolod.apps.fake.FakeContainerRuntime.from_context",
    provides=(IContainerRuntime,),
    config_keys={"images": []},
)

appsController = SubsystemPlugin(
    slot="apps",
    variant="controller",
    description="App commands and the desired-state controller over the container runtime",
    factory="piccolod.apps.service.AppsService.from_context",
    provides=(),
    # IControlStore for start order only: desired state is read through the
    # store.* commands that the persistence subsystem answers.
    requires=(IContainerRuntime, IServiceManager, IControlStore),
    config_keys="piccolod.apps.service.CONFIG_KEYS",
    default=True,
)

servicesProxy = SubsystemPlugin(
    slot="services",
    variant="proxy",
    description="Persisted ports, TCP and HTTP reverse proxies, the route table",
    factory="piccolod.services.service.ServiceManager.from_context",
    provides=(IServiceManager,),
    config_keys="piccolod.services.service.CONFIG_KEYS",
    default=True,
)
