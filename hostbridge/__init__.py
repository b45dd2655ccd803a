"""ovmd host bridge: one asyncio daemon that talks to the guest agents of many VMs.

Deliberately imports nothing: ``python -m hostbridge.daemon`` and the CLI import only what they use.
"""
