"""`ovmd -s TARGET`: template configuration run on the agent's own keys, as in the original."""

import json

from ovmproto import templatekeys as tk
from tests.guestagent.harness import Daemon, Host
from tests.templateconfig.support import chkconfig, plugin, template_dir

SHOW = plugin(
    "show",
    {"configure": 50, "cleanup": 50},
    """
    import json, sys
    from templateconfig.cli import main
    def show(param):
        keys = json.loads(param)
        if keys.get('fail.me'):
            from templateconfig.common import TemplateError
            raise TemplateError('fail.me: asked to fail')
        return param
    main(lambda t: '[]', {'configure': show, 'cleanup': show})
    """,
)


def test_ovmd_s_should_run_the_target_on_the_cached_keys_with_its_exit_status(
    tmp_path, monkeypatch
):
    d = template_dir(tmp_path, builtin=(), extra={"show": SHOW})
    assert chkconfig(d, "--add", "show").returncode == 0
    monkeypatch.setenv("OVM_TEMPLATE_DIR", str(d))
    monkeypatch.setenv("OVM_TEMPLATE_CONFIG_LOG", str(tmp_path / "run.log"))
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        assert daemon.ovmd("-p", "%s=req-1" % tk.REQUEST_KEY).returncode == 0
        ok = daemon.ovmd("-s", "configure")
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, "configure: show ok\n", "")
        # Reported to the host, as a first boot is.
        assert report(daemon) == {"state": "done", "run": "req-1", "error": "", "module.show": "ok"}
        assert daemon.ovmd("-p", "fail.me=yes").returncode == 0
        failed = daemon.ovmd("-s", "configure")
        assert failed.returncode == 1
        assert failed.stdout == "configure: show failed: fail.me: asked to fail\n"
        assert report(daemon) == {
            "state": "failed",
            "run": "req-1",
            "error": "show: fail.me: asked to fail",
            "module.show": "failed: fail.me: asked to fail",
        }
        # cleanup empties a sealed image's cache: it leaves no report there.
        assert daemon.ovmd("-x").returncode == 0
        assert daemon.ovmd("-s", "cleanup").returncode == 0
        assert report(daemon) == {}
        bad = daemon.ovmd("-s", "nosuch")
        assert bad.returncode == 2
        assert bad.stderr.startswith("ovm-template-config: ") and bad.stderr.count("\n") == 1


def report(daemon):
    """The report keys in the agent's cache, without their common prefix."""
    listing = daemon.ovmd("-l").stdout.splitlines()
    pairs = {k: v for line in listing for k, v in json.loads(line).items()}
    return {
        k[len(tk.REPORT_PREFIX) :]: v
        for k, v in pairs.items()
        if k.startswith(tk.REPORT_PREFIX) and k != tk.REQUEST_KEY
    }
