"""Cluster environment -> distributed launch: one launcher per node, one process per device."""

from safevid.launcher.local import launch_command, launch_env

__all__ = ["launch_command", "launch_env"]
