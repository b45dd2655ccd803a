"""ovm-template-config itself, with modules written as the original's were: the order, what each
hands on, a module that fails or hangs, --enumerate, the inputs and the exit statuses."""

import json
import os
import time

from tests.support.waiting import wait_for
from tests.templateconfig.support import chkconfig, lines, master, plugin, template_dir

# A third-party module as the original's were written (templateconfig.cli.main and run_cmd),
# recording what it saw into $TRACE, and handing on one more key.
RECORDER = """\
import json, os
from templateconfig.cli import main
from templateconfig.common import run_cmd

NAME = %r

def do_enumerate(target):
    return json.dumps([{'key': 'com.example.%%s.url' %% NAME, 'description': 'URL'},
                       {'key': 'com.example.secret', 'description': 'x', 'password': True}])

def do_configure(param):
    param = json.loads(param)
    with open(os.environ['TRACE'], 'a') as f:
        f.write(json.dumps([NAME, sorted(param)]) + '\\n')
    print('noise on stdout does not corrupt what is handed on')
    run_cmd(['true'])
    param['seen.' + NAME] = 'yes'
    return json.dumps(param)

if __name__ == '__main__':
    main(do_enumerate, {'configure': do_configure})
"""


def recorder(name, priority):
    return plugin(name, {"configure": priority}, RECORDER % name)


def setup(tmp_path, modules):
    d = template_dir(tmp_path, builtin=(), extra=modules)
    for name in modules:
        assert chkconfig(d, "--add", name).returncode == 0, name
    return d


def sleepers():
    """Processes running exactly `sleep 300`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if f.read() == b"sleep\x00300\x00":
                    found.append(pid)
        except OSError:
            pass
    return found


def trace(tmp_path):
    with open(tmp_path / "trace") as f:
        return [json.loads(line) for line in f]


def test_modules_should_run_in_priority_order_each_handing_on_to_the_next(tmp_path):
    d = setup(tmp_path, {"late": recorder("late", 80), "early": recorder("early", 20)})
    done = master(d, "--stdin", "configure", stdin=lines({"a.key": "v"}),
                  env={"TRACE": str(tmp_path / "trace")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "configure: early ok\nconfigure: late ok\n"
    assert trace(tmp_path) == [["early", ["a.key"]], ["late", ["a.key", "seen.early"]]]


def test_a_failing_module_should_be_reported_and_the_others_should_still_run(tmp_path):
    failing = plugin(
        "broken",
        {"configure": 50},
        """
        from templateconfig.cli import main
        from templateconfig.common import TemplateError
        def fail(param):
            raise TemplateError('com.example.url: not a URL')
        main(lambda t: '[]', {'configure': fail})
        """,
    )
    d = setup(tmp_path, {"first": recorder("first", 10), "broken": failing,
                         "last": recorder("last", 90)})  # fmt: skip
    done = master(d, "--stdin", "configure", stdin="{}", env={"TRACE": str(tmp_path / "trace")})
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "configure: first ok",
        "configure: broken failed: com.example.url: not a URL",
        "configure: last ok",
    ]
    # The failed module handed nothing on: the next one got what the failed one was given.
    assert trace(tmp_path)[1] == ["last", ["seen.first"]]


def test_a_module_that_hangs_should_be_killed_with_what_it_started_and_the_run_go_on(tmp_path):
    hanging = plugin(
        "hangs",
        {"configure": 10},
        """
        import subprocess, time
        from templateconfig.cli import main
        def hang(param):
            subprocess.Popen(['sleep', '300'])  # a child: killed with its group
            time.sleep(300)
        main(lambda t: '[]', {'configure': hang})
        """,
    )
    d = setup(tmp_path, {"hangs": hanging, "after": recorder("after", 20)})
    started = time.monotonic()
    done = master(d, "--timeout", "2", "--stdin", "configure", stdin="{}",
                  env={"TRACE": str(tmp_path / "trace")})  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "configure: hangs timeout: killed after 2s without finishing",
        "configure: after ok",
    ]
    assert time.monotonic() - started < 60
    # SIGKILL is sent to the group, but a killed child takes a moment to leave /proc; one that
    # survived would stay for 300 s.
    wait_for(lambda: not sleepers(), 10, what="the module's child to be killed")


def test_a_shell_module_should_run_too(tmp_path):
    shell = """\
        #!/bin/sh
        ### BEGIN PLUGIN INFO
        # name: shellmod
        # configure: 40
        # description: a module in another language
        ### END PLUGIN INFO
        [ "$1" = --enumerate ] && { echo '[]'; exit 0; }
        cat > /dev/null
        echo '{"from.shell": "yes"}'
        """
    d = setup(tmp_path, {"shellmod": shell})
    r, w = os.pipe()
    done = master(d, "--stdin", "--output", str(w), "configure", stdin="{}", pass_fds=(w,))
    os.close(w)
    assert done.returncode == 0, done.stderr
    assert json.loads(os.read(r, 65536)) == {"from.shell": "yes"}


def test_enumerate_should_list_each_modules_keys_with_its_priority(tmp_path):
    d = setup(tmp_path, {"late": recorder("late", 80), "early": recorder("early", 20)})
    done = master(d, "--enumerate", "configure")
    assert done.returncode == 0
    out = json.loads(done.stdout)
    assert [(p, n) for p, n, _ in out] == [("20", "early"), ("80", "late")]
    assert out[0][2][0] == {"key": "com.example.early.url", "description": "URL"}
    human = master(d, "--human-readable", "--enumerate", "configure", "--script", "late")
    assert human.stdout.startswith("[('80',\n  'late',")


def test_stdin_should_take_ovmd_l_lines_or_one_object(tmp_path):
    d = setup(tmp_path, {"only": recorder("only", 20)})
    for text in (lines({"a": "1", "b": "2"}), json.dumps({"a": "1", "b": "2"})):
        os.unlink(tmp_path / "trace") if (tmp_path / "trace").exists() else None
        done = master(d, "--stdin", "configure", stdin=text, env={"TRACE": str(tmp_path / "trace")})
        assert done.returncode == 0
        assert trace(tmp_path) == [["only", ["a", "b"]]]


def test_bad_input_and_bad_use_should_be_one_line_with_their_statuses(tmp_path):
    d = setup(tmp_path, {"only": recorder("only", 20)})
    bad = master(d, "--stdin", "configure", stdin='{"a": "1"}\nnot json\n')
    assert (bad.returncode, bad.stderr) == (
        4,
        "ovm-template-config: the input: line 2 is not JSON\n",
    )
    for args in (("nosuchtarget",), ("--script", "nosuch", "configure"), ()):
        done = master(d, *args)
        assert done.returncode == 2, args
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("ovm-template-config: ")


def test_without_an_input_option_it_should_say_when_the_agent_is_unreachable(tmp_path):
    d = setup(tmp_path, {"only": recorder("only", 20)})
    done = master(d, "--socket", str(tmp_path / "none.sock"), "configure")
    assert done.returncode == 3
    assert done.stderr.startswith("ovm-template-config: cannot read the agent's keys: ")


def test_the_run_log_should_name_modules_and_outcomes_but_never_a_value(tmp_path):
    d = setup(tmp_path, {"only": recorder("only", 20)})
    done = master(d, "--stdin", "configure", stdin=lines({"com.example.secret": "hunter2-value"}),
                  env={"TRACE": str(tmp_path / "trace")})  # fmt: skip
    assert done.returncode == 0
    log = (d / "run.log").read_text()
    assert "configure: only ok" in log
    assert "hunter2-value" not in log + done.stdout + done.stderr


def test_console_input_should_ask_for_each_key_not_hidden_and_not_echo_a_password(tmp_path):
    """--console-input on a real terminal (a pty that is the command's controlling tty)."""
    import fcntl
    import pty
    import select
    import subprocess
    import termios

    from tests.support.processes import child_env, script

    d = setup(tmp_path, {"only": recorder("only", 20)})
    master_fd, slave_fd = pty.openpty()

    def take_tty():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = child_env({"TRACE": str(tmp_path / "trace"),
                     "OVM_TEMPLATE_CONFIG_LOG": str(tmp_path / "log")})  # fmt: skip
    proc = subprocess.Popen(
        [script("ovm-template-config"), "--template-dir", str(d), "--console-input", "configure"],
        stdin=slave_fd, stdout=slave_fd, stderr=slave_fd, env=env,
        start_new_session=True, preexec_fn=take_tty,
    )  # fmt: skip
    os.close(slave_fd)
    seen = b""

    def expect(text, timeout=30):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master_fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(master_fd, 4096)
                except OSError:
                    break

    try:
        expect(b"URL [com.example.only.url]: ")
        os.write(master_fd, b"https://example.com/x\n")
        expect(b"x [com.example.secret]: ")
        os.write(master_fd, b"pw-typed-here\n")
        assert proc.wait(timeout=60) == 0
        expect(b"configure: only ok")
    finally:
        proc.kill()
        os.close(master_fd)
    assert b"pw-typed-here" not in seen  # not echoed
    assert trace(tmp_path) == [["only", ["com.example.only.url", "com.example.secret"]]]
