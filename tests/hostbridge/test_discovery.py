"""hostbridge.discovery: libvirt channel directories appearing and disappearing."""

import asyncio
import os
import socket

import pytest

from hostbridge.discovery import Discovery, Found, NameResolver, scan


def make_channel(base, dom_id, name):
    d = os.path.join(base, "domain-%d-%s" % (dom_id, name[:20]))
    os.makedirs(d)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(d, "com.oracle.ovmd"))
    s.listen(1)
    return d, s


@pytest.fixture
def base(short_dir):
    """A channel directory, as libvirt's /var/lib/libvirt/qemu/channel/target."""
    return str(short_dir)


def test_scan_should_find_channel_sockets_and_ignore_everything_else(base):
    _, s1 = make_channel(base, 3, "web1")
    os.makedirs(os.path.join(base, "domain-4-nochannel"))
    os.makedirs(os.path.join(base, "other-5-x"))
    d = os.path.join(base, "domain-6-plainfile")
    os.makedirs(d)
    open(os.path.join(d, "com.oracle.ovmd"), "w").close()
    found = scan([base, "/nonexistent/dir"])
    assert found == [Found(3, "web1", os.path.join(base, "domain-3-web1", "com.oracle.ovmd"))]
    s1.close()


class NoLibvirt(NameResolver):
    def __init__(self, names=None):
        super().__init__()
        self._libvirt = None
        self._virsh = None
        self.names = names or {}

    async def _query(self, dom_id):
        return self.names.get(dom_id)


def test_it_should_follow_vms_that_start_stop_and_restart_with_a_new_id(base):
    events = []

    async def found(name, path):
        events.append(("found", name, os.path.basename(os.path.dirname(path))))

    async def lost(name):
        events.append(("lost", name))

    async def main():
        disc = Discovery([base], found, lost, resolver=NoLibvirt())
        d1, s1 = make_channel(base, 1, "alpha")
        await disc.scan_once()
        _d2, s2 = make_channel(base, 2, "beta")
        await disc.scan_once()
        await disc.scan_once()  # nothing new: no event
        s1.close()
        import shutil

        shutil.rmtree(d1)
        await disc.scan_once()
        _d3, s3 = make_channel(base, 7, "alpha")  # restarted: a new id
        await disc.scan_once()
        for s in (s2, s3):
            s.close()

    asyncio.run(main())
    assert events == [
        ("found", "alpha", "domain-1-alpha"),
        ("found", "beta", "domain-2-beta"),
        ("lost", "alpha"),
        ("found", "alpha", "domain-7-alpha"),
    ]


def test_it_should_use_the_full_name_from_libvirt_and_fall_back_to_the_directorys(base):
    long_name = "a-very-long-virtual-machine-name"
    _, s1 = make_channel(base, 5, long_name)
    _, s2 = make_channel(base, 6, "another-long-vm-name-here")
    names = {}

    async def found(name, path):
        names[name] = path

    async def lost(name):
        pass

    resolver = NoLibvirt({5: long_name, 6: "mismatching-name"})
    asyncio.run(Discovery([base], found, lost, resolver=resolver).scan_once())
    assert sorted(names) == sorted(["another-long-vm-name", long_name])
    s1.close()
    s2.close()


def test_it_should_ask_virsh_for_the_name_when_it_exists(base, tmp_path):
    virsh = tmp_path / "virsh"
    virsh.write_text(
        '#!/bin/sh\n[ "$3" = domname ] && [ "$4" = 9 ] && echo \'full-name-from-virsh-x\'\n'
    )
    virsh.chmod(0o755)
    resolver = NameResolver()
    resolver._libvirt = None
    resolver._virsh = str(virsh)
    name = asyncio.run(resolver.resolve(Found(9, "full-name-from-virsh", "/x")))
    assert name == "full-name-from-virsh-x"
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    resolver._virsh = str(slow)
    assert asyncio.run(resolver.resolve(Found(10, "vm-ten", "/x"))) == "vm-ten"


def test_a_new_socket_in_a_directory_seen_before_should_be_resolved_again(base):
    # After a libvirtd restart, ids start again at 1: another VM sharing the first 20 characters
    # of the name gets the very directory our VM had. Taking it for our VM would send it our
    # VM's messages (found by tests/e2e/test_libvirt_discovery.py).
    prefix = "ovmd-shared-prefix-2"
    resolver = NoLibvirt({1: prefix + "-vm-a"})
    d, s = make_channel(base, 1, prefix + "-vm-a")
    [first] = scan([base])
    assert asyncio.run(resolver.resolve(first)) == prefix + "-vm-a"
    s.close()
    import shutil

    shutil.rmtree(d)
    resolver.retain(scan([base]))
    resolver.names = {1: prefix + "-vm-b"}
    d, s = make_channel(base, 1, prefix + "-vm-b")
    [second] = scan([base])
    assert second == first  # the same id, directory and path: only the socket differs
    assert asyncio.run(resolver.resolve(second)) == prefix + "-vm-b"
    s.close()


def test_discovery_should_survive_a_failing_scan_and_keep_scanning(base):
    # A scan that raised anything but OSError used to end the discovery task, silently.
    class FailsOnce(NoLibvirt):
        failed = False

        async def resolve(self, found):
            if not self.failed:
                self.failed = True
                raise RuntimeError("a broken libvirt binding")
            return await super().resolve(found)

    _, s = make_channel(base, 4, "web9")
    found = []

    async def on_found(name, path):
        found.append(name)

    async def on_lost(name):
        pass

    async def main():
        d = Discovery([base], on_found, on_lost, interval=0.05, resolver=FailsOnce())
        task = asyncio.ensure_future(d.run())
        for _ in range(100):
            if found:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    s.close()
    assert found == ["web9"]
