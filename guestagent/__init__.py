"""guestagent: the in-guest ovmd daemon and CLI.

Layers, lowest first (a module imports only from layers below it):

    config, logsetup              settings, logging (no protocol; ovmsys has the OS plumbing)
    channel, loop                 the virtio-serial port as bytes; the selectors/epoll event loop
    netlink                       the kernel's interfaces and addresses (routing netlink, struct)
    cache, store                  the key/value cache (pure) and its durable file
    facts                         the guest facts' keys and values (pure)
    service                       cache operations shared by both peers (validate, persist, wake)
    hostlink, localserver         the host over the channel; local programs over a unix socket
    factwatch                     keeps the guest facts current in the cache (netlink events)
    daemon                        wiring: signals, readiness, shutdown
    cli                           the ``ovmd`` command

Keep this module free of imports: the CLI's hot path imports the package.
"""

__version__ = "0.1.0"
