"""`vmmessage watch`'s lines for the pool's placement events (hostbridge.cli.watching)."""

from hostbridge.cli.watching import event_line


def test_a_vm_placed_event_should_say_which_host_delivers_the_vm_now():
    ev = {"id": 1, "time": 0.0, "type": "vm.placed", "vm": "web1", "host": "hv2"}
    assert event_line(ev).endswith(" web1 vm.placed on hv2")
    released = dict(ev, host=None)
    assert event_line(released).endswith(" web1 vm.placed on no host")
    hostile = dict(ev, host="hv\x1b[2J")  # a host's name is escaped as any guest string
    assert "\x1b" not in event_line(hostile)
