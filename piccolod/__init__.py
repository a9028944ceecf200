"""piccolod: the control-plane daemon of a local-first home-server appliance."""

__version__ = "0.1.0.dev0"
