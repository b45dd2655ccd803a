"""The built-in modules (scripts/NAME runs builtin/NAME.py): network, datetime, ssh, user,
authentication and system. Each validates every key it takes before it changes anything."""
