"""hostbridge.channels over real ptys and real unix sockets."""

import asyncio
import os
import socket
import termios

import pytest

from hostbridge.channels import ChannelClosed, ChannelFull, PtyChannel, UnixChannel

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def test_pty_should_link_a_raw_guest_end_and_wait_for_an_opener_without_spinning(short_dir):
    async def main():
        path = os.path.join(short_dir, "ch")
        ch = PtyChannel(path)
        assert os.path.islink(path)
        connect = asyncio.ensure_future(ch.connect())
        before = cpu_seconds()
        await asyncio.sleep(1.0)
        assert not connect.done()
        assert cpu_seconds() - before < 0.3  # a spinning probe would burn the whole second
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        attrs = termios.tcgetattr(fd)
        assert not attrs[3] & (termios.ICANON | termios.ECHO)  # raw, though nobody set it
        await asyncio.wait_for(connect, 5)
        ch.write(b"to guest\n")
        await asyncio.sleep(0.05)
        assert os.read(fd, 100) == b"to guest\n"
        os.write(fd, b"\xff to host\n")
        assert await ch.read() == b"\xff to host\n"
        os.close(fd)
        with pytest.raises(ChannelClosed):
            await ch.read()
        assert not ch.connected
        await ch.aclose()
        assert not os.path.lexists(path)

    run(main())


def test_pty_should_accept_a_new_opener_after_the_first_closed(short_dir):
    async def main():
        path = os.path.join(short_dir, "ch")
        ch = PtyChannel(path)
        for round_ in range(2):
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
            await asyncio.wait_for(ch.connect(), 5)
            os.write(fd, b"round %d\n" % round_)
            assert await ch.read() == b"round %d\n" % round_
            os.close(fd)
            with pytest.raises(ChannelClosed):
                await ch.read()
        assert ch.connects == 2
        await ch.aclose()

    run(main())


def test_pty_should_refuse_to_queue_without_bound_when_the_guest_never_reads(short_dir):
    async def main():
        path = os.path.join(short_dir, "ch")
        ch = PtyChannel(path, write_limit=64 * 1024)
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        await asyncio.wait_for(ch.connect(), 5)
        with pytest.raises(ChannelFull):
            for _ in range(1000):
                ch.write(b"x" * 1024)
        os.close(fd)
        await ch.aclose()

    run(main())


def test_unix_should_reconnect_with_backoff_until_the_socket_appears(short_dir):
    async def main():
        path = os.path.join(short_dir, "sock")
        ch = UnixChannel(path, backoff_max=0.2)
        connect = asyncio.ensure_future(ch.connect())
        await asyncio.sleep(0.5)
        assert not connect.done()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4)
        await asyncio.wait_for(connect, 5)
        peer, _ = srv.accept()
        peer.sendall(b"hi\n")
        assert await ch.read() == b"hi\n"
        ch.write(b"back\n")
        await asyncio.sleep(0.05)
        assert peer.recv(100) == b"back\n"
        peer.close()
        with pytest.raises(ChannelClosed):
            await ch.read()
        await asyncio.wait_for(ch.connect(), 5)  # the listener is still there: a new link
        assert ch.connects == 2
        await ch.aclose()
        srv.close()

    run(main())


def test_unix_should_refuse_writes_past_its_buffer_when_the_peer_never_reads(short_dir):
    async def main():
        path = os.path.join(short_dir, "sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        ch = UnixChannel(path, write_limit=256 * 1024)
        await asyncio.wait_for(ch.connect(), 5)
        with pytest.raises(ChannelFull):
            for _ in range(10000):
                ch.write(b"x" * 4096)
                await asyncio.sleep(0)
        await ch.aclose()
        srv.close()

    run(main())
