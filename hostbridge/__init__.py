"""ovmd host bridge: one asyncio daemon that talks to the guest agents of many VMs.

Deliberately imports nothing: ``python -m hostbridge.daemon`` and the CLI import only what they use.
"""

# The API's unix socket: the daemon binds it, the CLIs connect to it (config.api_socket and
# $VMMESSAGE_BRIDGE change it). Written once, here, where every part of the bridge can read it.
DEFAULT_API_SOCKET = "/run/hostbridge/api.sock"
