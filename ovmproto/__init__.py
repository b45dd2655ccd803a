"""ovmproto: the wire protocol shared by the guest agent and the host bridge.

Pure: bytes in, typed messages out, bytes back. Nothing here touches a file descriptor, a clock
or a random source except where a caller passes one in. Keep this package importable on Python 3.9
(guests run it) and keep this module free of imports: the guest CLI imports ``ovmproto.limits`` on
its hot path and must not pay for orjson or the message classes.
"""

__version__ = "0.1.0"

#: The version this code speaks best; a peer may negotiate down to MIN_VERSION.
PROTOCOL_VERSION = 1
MIN_VERSION = 1
