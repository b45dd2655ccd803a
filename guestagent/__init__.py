"""guestagent: the in-guest ovmd daemon and CLI.

Layers, lowest first (a module imports only from layers below it):

    config, logsetup              settings, logging (no protocol; ovmsys has the OS plumbing)
    channel, loop                 the virtio-serial port as bytes; the selectors/epoll event loop
    cache, store                  the key/value cache (pure) and its durable file
    service                       cache operations shared by both peers (validate, persist, wake)
    hostlink, localserver         the host over the channel; local programs over a unix socket
    daemon                        wiring: signals, readiness, shutdown
    cli                           the ``ovmd`` command

Keep this module free of imports: the CLI's hot path imports the package.
"""

__version__ = "0.1.0"
