"""ovmd host bridge: one asyncio daemon that talks to the guest agents of many VMs.

Deliberately imports nothing: ``python -m hostbridge.daemon`` and the CLI import only what they use.
"""

# The API's unix socket: the daemon binds it, the CLIs connect to it (config.api_socket and
# $VMMESSAGE_BRIDGE change it). Written once, here, where every part of the bridge can read it.
DEFAULT_API_SOCKET = "/run/hostbridge/api.sock"

# The bounds of a request's `timeout` (seconds), for the API, the CLIs and the config's
# query_timeout alike. Below the minimum the bridge cannot honour it: a guest's answer takes a
# round trip through the channel and, for a send, an fsync on each side, and every request the
# agent leaves unanswered in time sends its link through a resync. So a timeout under it is refused
# (400 / exit 2, the message names the minimum), not turned into an agent_timeout.
TIMEOUT_MIN = 0.1
TIMEOUT_MAX = 300.0
