"""Safe networking at start-up, each in a namespace of its own: the tap's host-side MAC (libvirt's
FE: rule, so the bridge's MAC never moves), a failed start removes the tap it made, a missing
bridge or state directory is a clear one-line error; and the config's collisions are reported."""
import os
import socket
import subprocess
import sys

import pytest
from pyroute2 import NetNS, netns

from appliance.config import ConfigError, load_config
from appliance.netns import inside
from conftest import REPO, free_port, start_daemon, stop_daemon

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
KVSTORE = ["--guest", "kvstore", "-m", "16", "--append", "ip=10.0.0.2/24 gw=10.0.0.1", "--no-http"]
GUEST_MAC = "52:54:00:ab:cd:ef"
PORT_MAC = "aa:00:00:00:00:01"     # above most random tap MACs: a tap of the kernel's choosing would lower the bridge's


@pytest.fixture
def host():
    """A namespace with br0, whose one other port has PORT_MAC (so br0 has it too)."""
    name = f"net{os.getpid() % 100000}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            ns.link("add", ifname="uplink", kind="veth", address=PORT_MAC, peer={"ifname": "uplink-peer"})
            bridge = ns.link_lookup(ifname="br0")[0]
            ns.link("set", index=ns.link_lookup(ifname="uplink")[0], master=bridge, state="up")
            ns.link("set", index=bridge, state="up")
            ns.link("add", ifname="notbr", kind="veth", peer={"ifname": "notbr-peer"})
        yield name
    finally:
        netns.remove(name)


def mac_of(namespace: str, ifname: str) -> str | None:
    with NetNS(namespace) as ns:
        found = ns.link_lookup(ifname=ifname)
        return ns.get_links(found[0])[0].get_attr("IFLA_ADDRESS") if found else None


def serve(namespace: str, tmp_path, *args: str, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``serve`` that must fail at start (run under ``wrapper`` if given): its result."""
    return subprocess.run(["ip", "netns", "exec", namespace, *wrapper, sys.executable, "-m", "appliance.cli", "serve",
                           "--name", "net", "--qmp", str(tmp_path / "net.qmp"), "--state-dir", str(tmp_path),
                           *KVSTORE, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_tap_gets_the_guests_mac_with_fe_first_and_the_bridge_keeps_its_own(host, guest_images, tmp_path):
    assert mac_of(host, "br0") == PORT_MAC
    d = start_daemon(tmp_path, *KVSTORE, "--nic", f"tap=tap0,bridge=br0,mac={GUEST_MAC}", namespace=host)
    try:
        assert mac_of(host, "tap0") == "fe:54:00:ab:cd:ef"       # locally administered, not the guest's
        assert mac_of(host, "br0") == PORT_MAC                   # the tap joining did not change it
    finally:
        stop_daemon(d)
    assert d.proc.returncode == 0, d.log()
    assert mac_of(host, "tap0") is None and mac_of(host, "br0") == PORT_MAC   # nor its leaving
    d = start_daemon(tmp_path, *KVSTORE, "--nic", "tap=tap0,bridge=br0,mac=fe:00:00:00:00:07", namespace=host)
    try:
        assert mac_of(host, "tap0") == "fa:00:00:00:00:07"       # never the guest's own, even an FE: one
    finally:
        stop_daemon(d)


def test_a_failed_start_removes_the_tap_it_created(host, guest_images, tmp_path):
    port = free_port()
    with inside(host), socket.create_server(("127.0.0.1", port)):      # the QMP port is taken
        result = serve(host, tmp_path, "--nic", "tap=tap0,bridge=br0", "--qmp-tcp", f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr and "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert mac_of(host, "tap0") is None
    # A tap the operator made is theirs: a failed start leaves it.
    with NetNS(host) as ns:
        ns.link("add", ifname="tap9", kind="tuntap", mode="tap")
    result = serve(host, tmp_path, "--nic", "tap=tap9,bridge=nobr")
    assert result.returncode == 1 and mac_of(host, "tap9") is not None


def error_line(stderr: str) -> str:
    """The message of the daemon's one log line on stderr, which must be an error."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and " level=error " in lines[0], stderr
    return lines[0].split(' msg="', 1)[1][:-1].replace('\\"', '"')


def test_a_missing_bridge_says_how_to_create_it(host, guest_images, tmp_path):
    result = serve(host, tmp_path, "--nic", "tap=tap0,bridge=br7")
    assert result.returncode == 1
    assert error_line(result.stderr) == (
        "guest: bridge br7 does not exist: create it first, e.g. "
        "'ip link add br7 type bridge && ip link set br7 up' (docs/operations.md)")
    assert mac_of(host, "tap0") is None
    result = serve(host, tmp_path, "--nic", "tap=tap0,bridge=notbr")
    assert result.returncode == 1 and "notbr is not a bridge (its kind is veth)" in result.stderr
    assert "Traceback" not in result.stderr and mac_of(host, "tap0") is None


def test_no_permission_for_the_tap_is_a_clear_error(host, guest_images, tmp_path):
    result = serve(host, tmp_path, "--nic", "tap=tap0,bridge=br0", wrapper=("setpriv", "--bounding-set=-net_admin", "--"))
    assert result.returncode == 1
    assert error_line(result.stderr) == ("guest: cannot set up tap tap0: Operation not permitted "
                                     "(creating a tap needs CAP_NET_ADMIN)")


def test_a_missing_state_dir_is_created_and_an_impossible_one_is_a_clear_error(host, guest_images, tmp_path):
    state = tmp_path / "missing" / "node"
    d = start_daemon(tmp_path, *KVSTORE, "--state-dir", str(state), namespace=host)
    try:
        assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    finally:
        stop_daemon(d)
    assert d.proc.returncode == 0, d.log()
    assert (state / "test-node-console.log").exists()
    (tmp_path / "a-file").write_text("")
    result = serve(host, tmp_path, "--state-dir", str(tmp_path / "a-file" / "node"))
    assert result.returncode == 2
    assert error_line(result.stderr) == (f"cannot create the state directory "
                                     f"{tmp_path / 'a-file' / 'node'}: Not a directory")


def test_config_unknown_keys_wrong_types_and_port_collisions(tmp_path):
    path = tmp_path / "node.toml"
    for text, message in [
            ('[node]\nqmp_tcpp = "127.0.0.1:4445"\n',
             "unknown key(s) ['qmp_tcpp'] in [node]; valid: ['http', 'http_allow_local_uris', 'http_allowed_hosts', "
             "'http_token_file', 'incoming', 'log_format', 'migrate_file_overwrite', 'name', 'qmp', "
             "'qmp_max_clients', 'qmp_tcp', 'state_dir']"),
            ('[peers]\nsecondary = "10.0.0.3"\n',
             "unknown section(s) ['peers']; valid: node, guest, colo, netfilter, migration, tls-creds, authz"),
            ('[guest]\nmemory = "64"\n', "[guest] memory must be an integer, not '64'"),
            ('[colo]\nheartbeat_port = true\n', "[colo] heartbeat_port must be an integer, not True"),
            ('[node]\nqmp_tcp = "127.0.0.1:4444"\nincoming = "tcp:0.0.0.0:4444"\n',
             "qmp_tcp (--qmp-tcp) 127.0.0.1:4444 and incoming (--incoming) tcp:0.0.0.0:4444 both listen on "
             "TCP port 4444: give each its own port"),
            ('[node]\nhttp = "127.0.0.1:4447"\n[netfilter]\npacket_port = 4447\n',
             "http (--http) 127.0.0.1:4447 and [netfilter] packet_port (--colo-packet-port) 4447 both listen on "
             "TCP port 4447")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(str(path)).validate()
        assert message in str(raised.value)
    path.write_text('[node]\nqmp_tcp = "127.0.0.1:4444"\nincoming = "tcp:10.0.0.11:4444"\n')
    load_config(str(path)).validate()                  # different addresses, no collision


def test_a_flag_that_overrides_the_file_is_reported_with_both(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nname = "from-file"\n[guest]\nmemory = 32\n')
    d = start_daemon(tmp_path, "--config", str(config), name="from-flag")
    try:
        assert "node from-flag ready" in d.log()
        assert f'--name \\"from-flag\\" overrides [node] name = \\"from-file\\" of {config}' in d.log()
        assert "memory" not in d.log()                 # keys the flags left alone are not reported
    finally:
        stop_daemon(d)
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config), "--no-http",
                             "--qmp-tcp", "127.0.0.1:4444", "--incoming", "tcp:0.0.0.0:4444"],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 2 and "both listen on TCP port 4444" in result.stderr
