# twistd -ny piccolod.tac — the same tree as `twistd -n piccolod`, on its
# embedded defaults, or with PICCOLOD_CONFIG naming a TOML config file.
import os

from twisted.application.service import Application

from piccolod.tap import Options, makeService

options = Options()
args = []
if os.environ.get("PICCOLOD_CONFIG"):
    args += ["--config", os.environ["PICCOLOD_CONFIG"]]
options.parseOptions(args)

application = Application("piccolod")
makeService(options).setServiceParent(application)
