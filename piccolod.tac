# twistd -ny piccolod.tac: the same tree as `twistd -n piccolod`, on its
# embedded defaults.  Environment variables stand in for the options:
# PICCOLOD_CONFIG (--config), PICCOLOD_STATE_DIR (--state-dir),
# PICCOLOD_LISTEN (--listen) and PICCOLOD_USE ("slot=variant,slot=variant").
import os

from twisted.application.service import Application

from piccolod.tap import Options, makeService

args = []
for variable, option in (
    ("PICCOLOD_CONFIG", "--config"),
    ("PICCOLOD_STATE_DIR", "--state-dir"),
    ("PICCOLOD_LISTEN", "--listen"),
):
    if os.environ.get(variable):
        args += [option, os.environ[variable]]
for choice in filter(None, os.environ.get("PICCOLOD_USE", "").split(",")):
    args += ["--use", choice.strip()]

options = Options()
options.parseOptions(args)

application = Application("piccolod")
makeService(options).setServiceParent(application)
