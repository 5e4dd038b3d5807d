"""The command line: one-shot and interactive QMP, version, config files and flags."""
import json
import os
import subprocess
import sys

from appliance.cli import SyncQMPClient
from conftest import REPO, free_port, start_daemon, stop_daemon

CLI = [sys.executable, "-m", "appliance.cli"]


def run(*args, stdin=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, input=stdin, timeout=60)


def test_version():
    result = run("version")
    assert result.returncode == 0 and result.stdout.strip() == "colo-appliance 0.1.0"


def test_one_shot_commands(daemon):
    result = run("qmp", daemon.qmp, "query-status")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"running": True, "singlestep": False, "status": "running"}
    result = run("qmp", daemon.qmp, "migrate-set-parameters", "downtime-limit=500", "tls-hostname=peer")
    assert result.returncode == 0, result.stderr
    params = json.loads(run("qmp", daemon.qmp, "query-migrate-parameters").stdout)
    assert params["downtime-limit"] == 500 and params["tls-hostname"] == "peer"
    result = run("qmp", daemon.qmp, "migrate-set-parameters", "compress-level=10")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: GenericError: Parameter 'compress_level' expects a value between 0 and 9"
    result = run("qmp", daemon.qmp, "migrate-set-capabilities",
                 'capabilities=[{"capability": "events", "state": true}]')
    assert result.returncode == 0


def test_interactive_mode(daemon, tmp_path):
    env_home = tmp_path / "home"
    env_home.mkdir()
    result = subprocess.run([*CLI, "qmp", daemon.qmp], input="query-status\nstop\nbogus\n", capture_output=True,
                            text=True, cwd=REPO, timeout=60, env={**os.environ, "HOME": str(env_home)})
    assert result.returncode == 0, result.stderr
    assert '"status": "running"' in result.stdout
    assert "The command bogus has not been found" in result.stderr
    assert (env_home / ".colo-appliance-qmp-history").exists()


def test_unreachable_socket(tmp_path):
    result = run("qmp", str(tmp_path / "none.qmp"), "query-status")
    assert result.returncode == 1 and "cannot connect" in result.stderr


def test_config_file_and_flag_override(tmp_path):
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nname = "from-file"\nqmp_tcp = "127.0.0.1:{port}"\n')
    d = start_daemon(tmp_path, "--config", str(config), name="from-flag")
    try:
        assert "node from-flag ready" in d.log()          # the flag wins over the file
        result = run("qmp", f"127.0.0.1:{port}", "query-status")   # the file's TCP listener
        assert result.returncode == 0, result.stderr
    finally:
        stop_daemon(d)


def test_bad_config_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nnmae = "typo"\n')
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "unknown key(s) ['nmae'] in [node]" in result.stderr
    config.write_text("[node\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2 and "cannot read config" in result.stderr


def test_migrate_with_progress(tmp_path):
    """Source and destination daemons on this host; the CLI drives the migration and reports.
    With stdout a pipe it prints one line per state, a summary, and puts its --set/--cap back."""
    port = free_port()
    guest = ["--guest", "memdirty", "-m", "32", "--append", "mib=8 rate=0",
             "--uuid", "5f1c0b8e-2d7a-4c1e-9a53-0c6f1d2e3b4a"]
    src = start_daemon(tmp_path, *guest, name="cli-src")
    dst = start_daemon(tmp_path, *guest, "--incoming", f"tcp:127.0.0.1:{port}", name="cli-dst")
    try:
        result = run("migrate", src.qmp, f"tcp:127.0.0.1:{port}", "--cap", "events", "--cap", "validate-uuid",
                     "--set", "max-bandwidth=0", "--set", "downtime-limit=200")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert [line.split()[0] for line in lines[:-2]] == ["setup", "active", "device", "completed"], lines
        assert all("Mbps" in line and "%" in line for line in lines[1:-2])
        assert lines[-2].startswith("completed in ") and "downtime" in lines[-2] and "Mbps" in lines[-2]
        assert lines[-1] == ("restored: max-bandwidth=134217728, downtime-limit=300, capability events off, "
                             "capability validate-uuid off")
        source, destination = SyncQMPClient(src.qmp), SyncQMPClient(dst.qmp)
        params = source.execute("query-migrate-parameters")["return"]
        assert params["max-bandwidth"] == 134217728 and params["downtime-limit"] == 300
        assert not any(c["state"] for c in source.execute("query-migrate-capabilities")["return"])
        assert destination.execute("query-status")["return"]["status"] == "running"

        # A failure prints the error, not an empty bar; --keep-settings says the value stays.
        result = run("migrate", src.qmp, "tcp:127.0.0.1:1", "--set", "downtime-limit=123", "--keep-settings")
        assert result.returncode == 1
        assert "migration failed: " in result.stderr and "Connection refused" in result.stderr
        assert "[" not in result.stdout
        assert result.stdout.splitlines()[-1] == "kept for later migrations: downtime-limit=123"
        assert source.execute("query-migrate-parameters")["return"]["downtime-limit"] == 123
        source.close()
        destination.close()
    finally:
        stop_daemon(src)
        stop_daemon(dst)


def test_progress_line():
    from appliance.cli import progress_line
    info = {"status": "active", "expected-downtime": 12, "ram": {
        "transferred": 3 << 20, "remaining": 0, "total": 16 << 20, "normal": 512, "duplicate": 1536,
        "dirty-sync-count": 1, "mbps": 800.0, "page-size": 4096}}
    line = progress_line(info, width=10)
    assert line.startswith("active     [#####     ]  50.0%") and "expected downtime 12 ms" in line


def _every_parser():
    import argparse

    from appliance.cli import build_parser
    parsers = [("colo-appliance", build_parser())]
    for name, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return parsers


def test_every_command_has_version(capsys):
    import pytest

    from appliance.cli import main
    commands = [name.split()[1:] for name, _ in _every_parser()]
    assert len(commands) >= 6
    for words in commands:
        with pytest.raises(SystemExit) as exit_status:
            main([*words, "--version"])
        assert exit_status.value.code == 0 and capsys.readouterr().out == "colo-appliance 0.1.0\n", words
    result = run("serve", "--version")          # and as the installed command runs it
    assert result.returncode == 0 and result.stdout == "colo-appliance 0.1.0\n"


def test_help_explains_every_option_in_plain_text():
    import argparse
    for name, parser in _every_parser():
        text = parser.format_help()
        for markup in ("``", ":ref:", ":option:", ":class:", ".. "):
            assert markup not in text, (name, markup)
        assert parser.description, name
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue            # refused on purpose, never shown
            assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
