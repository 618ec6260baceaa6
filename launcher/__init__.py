"""Cluster environment -> distributed launch: one launcher per node, one process per device."""

from safevid.launcher.local import launch_command

__all__ = ["launch_command"]
