"""The real daemon's life: readiness, signals, crashes, the host leaving and coming back, idle
CPU."""

import os
import resource
import signal
import subprocess
import time

from ovmproto.codec import encode
from ovmproto.messages import Delete, Err, Get, List, Ok, Ping, Set
from tests.guestagent.harness import Daemon, Host, NotifySocket
from tests.support.processes import PYTHON
from tests.support.waiting import wait_for

# The console script, run by the venv's interpreter (its shebang's) as systemd would run it.
OVMD_SCRIPT = os.path.join(os.path.dirname(PYTHON), "ovmd")


def test_it_should_tell_systemd_ready_and_status_and_stop_cleanly_on_sigterm():
    with Host() as host, NotifySocket() as notify:
        with Daemon(channel=host.link, env=notify.env()) as daemon:
            ready = notify.wait_for("READY=1")
            assert "STATUS=host connected" in ready.split("\n")
            assert os.path.exists(daemon.socket)  # READY=1 only once the socket listens
            host.disconnect()
            assert notify.wait_for("STATUS=waiting for host on %s" % host.link)
            host.reconnect()
            host.hello()
            notify.messages[:] = []
            assert daemon.stop() == 0
            notify.wait_for("STOPPING=1")
            assert not os.path.exists(daemon.socket)
            assert "Traceback" not in daemon.log()


def test_it_should_feed_the_systemd_watchdog_when_asked():
    with Host() as host, NotifySocket() as notify:
        env = dict(notify.env(), WATCHDOG_USEC="200000")
        with Daemon(channel=host.link, env=env):
            notify.wait_for("READY=1")
            notify.messages[:] = []
            notify.wait_for("WATCHDOG=1")
            notify.messages[:] = []
            notify.wait_for("WATCHDOG=1")  # again: it repeats (every 0.1 s here)


def test_sigint_should_stop_it_too():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        daemon.signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 0


def test_a_bad_option_should_be_one_line_and_exit_2():
    out = subprocess.run(
        [PYTHON, "-m", "guestagent.daemon", "--max-keys", "many", "--config", "/nonexistent"],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ovmd: ") and "--max-keys" in lines[0]
    assert "'many'" in lines[0]


def test_every_acknowledged_host_set_should_survive_kill_9():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello(epoch="crash")
        total = 400
        frames = [
            encode(Set(id=1000 + seq, key="k%d" % seq, value="v%d" % seq, seq=seq))
            for seq in range(1, total + 1)
        ]
        acked = set()
        sent = 0
        # Stream the sets without waiting for each answer; kill the daemon mid-stream.
        while len(acked) < 60:
            if sent < total:
                host.send(b"".join(frames[sent : sent + 20]))
                sent += 20
            host.poll(0.05)
            acked.update(m.seq for m in host.pending if type(m) is Ok and m.seq)
        daemon.kill()
        host.drain(0.2)  # what it wrote before it died was acknowledged too
        acked.update(m.seq for m in host.pending if type(m) is Ok and m.seq)
        assert not any(type(m) is Err for m in host.pending)
        assert len(acked) < total, "the daemon finished before it was killed: test too weak"
        host.pending = []

        daemon.start().wait_ready()
        h = host.hello(epoch="crash")
        assert h.hseq >= max(acked)
        for seq in acked:
            got = host.request(Get, key="k%d" % seq)
            assert (type(got), got.value) == (Ok, "v%d" % seq), seq
        # The host resumes its outbox after hseq: everything ends up applied exactly once.
        for seq in range(1, total + 1):
            host.send(frames[seq - 1])
        for seq in range(1, total + 1):
            reply = host.reply(1000 + seq)
            assert type(reply) is Ok and (reply.dup is True) == (seq <= h.hseq), seq
        items, _ = host.listing(List)
        assert sorted(i.key for i in items) == sorted("k%d" % s for s in range(1, total + 1))


def test_the_host_leaving_and_coming_back_should_resync_and_see_guest_changes():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        first = host.hello(epoch="away")
        host.request(Set, key="before", value="1", seq=1)
        # The `changed` follows the ok: take it before leaving, or the disconnect may drop it.
        assert host.wait_changed(1)[-1].key == "before"
        host.disconnect()
        with daemon.client() as c:
            # Changes made while the host is away are not announced (no host to hear them)...
            assert type(c.request(Set, key="while.away", value="2")) is Ok
        host.reconnect()
        # ...but the hello reply's gseq shows them; stale partial bytes before RESYNC are dropped.
        back = host.hello(epoch="away", garbage=b'{"t":"set","id":5,"key":"stale","value":"x')
        assert (back.gid, back.epoch, back.hseq) == (first.gid, "away", 1)
        assert back.gseq == first.gseq + 2
        items, _ = host.listing(List)
        assert [i.key for i in items] == ["before", "while.away"]
        assert host.changed == [c for c in host.changed if c.key == "before"]
        assert host.request(Get, key="stale").code == "not_found"
        with daemon.client() as c:
            c.request(Set, key="after", value="3")
        assert host.wait_changed(2)[-1].key == "after"


def test_sighup_should_reopen_the_channel():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reopening the channel" in daemon.log(), what="reopen")
        assert host.hello(epoch="after-hup").epoch == "after-hup"
        assert type(host.request(Ping)) is Ok


def test_it_should_wait_for_a_missing_channel_and_serve_locally_meanwhile():
    with Host() as host:
        host.disconnect()  # the link points nowhere: no port yet
        with Daemon(channel=host.link) as daemon:
            daemon.wait_ready()
            with daemon.client() as c:
                assert type(c.request(Set, key="early", value="1")) is Ok
            host.reconnect()
            h = host.hello(timeout=15)  # retries back off to ~2 s
            assert h.gseq == 1
            assert daemon.log().count("not there yet") == 1  # logged once, not at every try


def _limit_file_size(pid, limit):
    # A real write error: past RLIMIT_FSIZE a write fails with EFBIG (Python ignores SIGXFSZ).
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_a_change_the_disk_cannot_take_should_be_refused_and_change_nothing():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()
        with daemon.client() as c:
            assert type(c.request(Set, key="kept", value="secret-one")) is Ok
            _limit_file_size(daemon.pid, 40_000)
            big = "secret-" + "x" * 8000
            for n in range(10):  # the journal grows until the next change does not fit
                refused = c.request(Set, key="big%d" % n, value=big)
                if type(refused) is Err:
                    break
            assert (type(refused), refused.code) == (Err, "internal"), "never refused"
            assert n >= 2
            refused = host.request(Set, key="h", value=big, seq=1)
            assert (type(refused), refused.code) == (Err, "internal")
            assert c.request(Get, key="big%d" % n).code == "not_found"
            assert c.request(Get, key="h").code == "not_found"
            assert c.request(Get, key="kept").value == "secret-one"
            # A delete rewrites the files whole (the value must leave them): too big now.
            _limit_file_size(daemon.pid, 4_000)
            refused = c.request(Delete, key="big0")
            assert (type(refused), refused.code) == (Err, "internal")
            assert c.request(Get, key="big0").value == big
            _limit_file_size(daemon.pid, resource.RLIM_INFINITY)
            assert type(c.request(Delete, key="big0")) is Ok
            assert type(c.request(Set, key="kept", value="secret-four")) is Ok
            assert host.request(Set, key="h", value="secret-five", seq=1).dup is None
            log = daemon.log()
            assert "cache.journal" in log and "cache.json" in log  # the failures were logged...
            assert "secret" not in log  # ...and no value ever is
        daemon.stop()
        daemon.start().wait_ready()
        with daemon.client() as c:
            assert c.request(Get, key="kept").value == "secret-four"
            assert c.request(Get, key="h").value == "secret-five"
            assert c.request(Get, key="big0").code == "not_found"
            assert [c.request(Get, key="big%d" % i).value for i in range(1, n)] == [big] * (n - 1)


def test_it_should_use_almost_no_cpu_while_the_host_is_away():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello()
        # The worst case: the master closes but the device stays, so each reopen hangs up
        # at once; retries must slow down to the backoff's cap, not spin.
        host.disconnect(keep_device=True)
        wait_for(lambda: "reopening it when it is back" in daemon.log(), what="hangup seen")
        time.sleep(1.0)  # let the backoff grow (the first retries are quick on purpose)
        start = time.monotonic()
        start_cpu, start_wakeups = daemon.cpu_seconds(), daemon.wakeups()
        time.sleep(3.0)  # measuring over a period, not asserting on a sleep
        elapsed = time.monotonic() - start
        used = (daemon.cpu_seconds() - start_cpu) / elapsed
        wakeups = daemon.wakeups() - start_wakeups
        assert used < 0.05, "the daemon used %.1f%% of a CPU while idle" % (used * 100)
        assert wakeups <= 10, "%d wakeups in %.1fs while idle" % (wakeups, elapsed)
        assert daemon.proc.poll() is None
        assert daemon.log().count("reopening it when it is back") == 1  # not at every retry


def test_ovmd_daemon_should_not_keep_click_in_its_memory():
    # click costs the daemon 1.6 MB of resident memory for its whole life; `ovmd --daemon` reads
    # its few options without it. -X importtime lists every module the process imported.
    class Traced(Daemon):
        def command(self):
            return [PYTHON, "-X", "importtime", OVMD_SCRIPT, "--daemon", *self.options()]

    with Host() as host, Traced(channel=host.link) as daemon:
        daemon.wait_ready()
        host.hello(epoch="traced")
        daemon.stop()
        imported = {
            line.split("|")[-1].strip()
            for line in daemon.log().splitlines()
            if line.startswith("import time:")
        }
    assert "guestagent.daemon" in imported
    assert "click" not in imported
