import os
import select
import termios

from guestagent.channel import Channel, find_port
from tests.support.ptys import open_raw_pty


def make_sysfs(tmp_path, ports):
    sysfs = tmp_path / "sys"
    for port, name in ports.items():
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    return str(sysfs)


def test_find_port_should_prefer_the_udev_link(tmp_path):
    link = tmp_path / "com.oracle.ovmd"
    link.write_text("")
    sysfs = make_sysfs(tmp_path, {"vport0p1": "com.oracle.ovmd"})
    assert find_port(str(link), sysfs, "/dev") == str(link)


def test_find_port_should_fall_back_to_the_sysfs_name(tmp_path):
    sysfs = make_sysfs(
        tmp_path, {"vport0p1": "org.qemu.guest_agent.0", "vport0p2": "com.oracle.ovmd"}
    )
    assert find_port(str(tmp_path / "nolink"), sysfs, "/dev") == "/dev/vport0p2"


def test_find_port_should_return_none_when_there_is_no_port(tmp_path):
    sysfs = make_sysfs(tmp_path, {"vport0p1": "org.qemu.guest_agent.0"})
    assert find_port(str(tmp_path / "nolink"), sysfs, "/dev") is None
    assert find_port(str(tmp_path / "nolink"), str(tmp_path / "nosysfs"), "/dev") is None


def read_until(ch, end):
    got = b""
    for _ in range(1000):
        data = ch.read()
        if data:
            got += data
            if got.endswith(end):
                break
        else:
            select.select([ch.fd], [], [], 0.01)
    return got


def test_open_should_make_a_tty_raw_without_losing_input_already_written():
    master, slave, path = open_raw_pty()
    try:
        # A cooked terminal, and a host that wrote before the agent opened the port.
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.ECHO | termios.ICANON
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.write(master, b'{"t":"ping","id":1}\n')
        # The echo proves the line discipline took the line in while still cooked.
        echo = b""
        while not echo.endswith(b"\n") and select.select([master], [], [], 5)[0]:
            echo += os.read(master, 100)
        assert echo.startswith(b'{"t"')
        ch = Channel.open(path)
        try:
            assert ch.is_tty
            lflag = termios.tcgetattr(ch.fd)[3]
            assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)
            # TCSAFLUSH would have discarded this line.
            assert read_until(ch, b"\n") == b'{"t":"ping","id":1}\n'
            # Raw now: 0x04 is a byte, not end-of-file; long lines are not cut at 4095 bytes.
            os.write(master, b"\x04" + b"x" * 5000 + b"\n")
            assert read_until(ch, b"\n") == b"\x04" + b"x" * 5000 + b"\n"
            assert ch.read() is None  # nothing more: would block, not EOF
            assert ch.write(b"x\n") == 2
            assert os.read(master, 10) == b"x\n"  # no \r added
        finally:
            ch.close()
    finally:
        os.close(master)
        os.close(slave)


def test_open_should_turn_off_modem_control_and_flow_control_as_a_serial_port_needs():
    master, slave, path = open_raw_pty()
    try:
        # As a serial line may come: hang up on close, hardware and software flow control.
        attrs = termios.tcgetattr(slave)
        attrs[2] = (attrs[2] | termios.HUPCL | termios.CRTSCTS) & ~termios.CLOCAL
        attrs[0] |= termios.IXON | termios.IXOFF
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        ch = Channel.open(path)
        try:
            iflag, _, cflag = termios.tcgetattr(ch.fd)[:3]
            assert cflag & termios.CLOCAL and cflag & termios.CREAD
            assert not cflag & (termios.HUPCL | termios.CRTSCTS)
            assert not iflag & (termios.IXON | termios.IXOFF | termios.IXANY)
            # XOFF (0x13) and XON (0x11) are bytes like any other.
            os.write(master, b"\x13\x11\n")
            assert read_until(ch, b"\n") == b"\x13\x11\n"
        finally:
            ch.close()
    finally:
        os.close(master)
        os.close(slave)


def test_open_should_not_touch_termios_on_a_plain_device():
    ch = Channel.open("/dev/null")  # a character device that is not a tty, like the real port
    try:
        assert not ch.is_tty
        assert ch.read() == b""
    finally:
        ch.close()
    assert ch.fd == -1
    ch.close()  # twice is harmless


def test_open_should_raise_oserror_for_a_missing_path(tmp_path):
    try:
        Channel.open(str(tmp_path / "missing"))
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("expected FileNotFoundError")
