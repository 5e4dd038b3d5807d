"""The schema is QEMU's migration.json, complete, plus the QMP basics."""
import os

import pytest

from appliance.qapi import Schema, default_schema
from appliance.qapi.parser import QAPISyntaxError, parse_schema
from appliance.qapi.schema import SCHEMA_DIR, Alternate, Enum, Struct, Union

SEED = os.path.join(SCHEMA_DIR, "migration.json")


def _seed_names(kind):
    return [e[kind] for e in parse_schema(SEED) if kind in e]


def test_every_migration_definition_is_in_the_schema():
    schema = default_schema()
    commands = _seed_names("command")
    assert len(commands) == 27
    assert set(commands) <= set(schema.commands)
    events = _seed_names("event")
    assert len(events) == 4 and set(events) <= set(schema.events)
    for kind in ("struct", "enum", "alternate", "union"):
        for name in _seed_names(kind):
            assert name in schema.types, name


def test_basics_from_qemu_control_plane():
    schema = default_schema()
    for name in ("qmp_capabilities", "query-version", "query-commands", "query-status",
                 "stop", "cont", "quit", "getfd"):
        assert name in schema.commands
    assert isinstance(schema.types["StrOrNull"], Alternate)
    sockaddr = schema.types["SocketAddress"]
    assert isinstance(sockaddr, Union) and sockaddr.discriminator == "type"
    assert set(sockaddr.variants) == {"inet", "unix", "vsock", "fd"}


def test_flags_and_conditions():
    schema = default_schema()
    assert schema.commands["migrate-set-parameters"].boxed
    assert schema.commands["migrate-recover"].allow_oob and schema.commands["migrate-pause"].allow_oob
    assert not schema.commands["migrate"].allow_oob
    deprecated = {n for n, c in schema.commands.items() if c.deprecated}
    assert deprecated == {"migrate_set_downtime", "migrate_set_speed", "migrate-set-cache-size",
                          "query-migrate-cache-size"}
    assert schema.types["MultiFDCompression"].values == ["none", "zlib", "zstd"]
    assert "xen-set-replication" in schema.commands


def test_if_conditions_follow_the_build_config():
    bare = Schema(config=frozenset())
    assert bare.types["MultiFDCompression"].values == ["none", "zlib"]
    assert "xen-set-replication" not in bare.commands
    assert "ReplicationStatus" not in bare.types
    assert [m.name for m in bare.types["UnixSocketAddress"].members] == ["path"]


def test_members_keep_schema_order_and_optionality():
    params = default_schema().types["MigrateSetParameters"]
    assert isinstance(params, Struct)
    assert params.members[0].name == "announce-initial" and params.members[0].optional
    assert default_schema().types["MigrationParameter"].values[-1] == "block-bitmap-mapping"
    caps = default_schema().types["MigrationCapability"]
    assert isinstance(caps, Enum) and caps.values[0] == "xbzrle" and len(caps.values) == 19


@pytest.mark.parametrize("text, message", [
    ("{ 'enum': 'X', 'data': [ 'a' ] ", "expected '}'"),
    ("{ 'enum' 'X' }", "expected ':'"),
    ("{ 'a': 1 }", "unexpected '1'"),
    ("{ 'a': true, 'a': false }", "duplicate key 'a'"),
    ("[ 'x' ]", "expected '{'"),
])
def test_parser_rejects_bad_syntax(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(QAPISyntaxError, match=message):
        parse_schema(str(path))
