"""Every state and message enumeration the engine keeps in code is QEMU's, as the schema
declares it (values and, for COLOMessage, the wire numbers given by their order)."""
import pytest

from appliance.qapi import default_schema
from colo.failover import TRANSITIONS as FAILOVER_TRANSITIONS, FailoverStatus
from colo.protocol import ColoMessage, ColoMode, ExitReason
from replication.state import TRANSITIONS as MIGRATION_TRANSITIONS, MigrationRun, MigrationStatus


def schema_enum(name: str) -> list[str]:
    return list(default_schema().types[name].values)


def test_colo_enums_are_the_schemas():
    assert [m.wire_name for m in sorted(ColoMessage)] == schema_enum("COLOMessage")
    assert [m.value for m in ColoMessage] == list(range(len(ColoMessage)))
    assert [m.value for m in FailoverStatus] == schema_enum("FailoverStatus")
    assert [m.value for m in ColoMode] == schema_enum("COLOMode")
    assert [m.value for m in ExitReason] == schema_enum("COLOExitReason")


def test_migration_statuses_are_the_schemas_and_the_table_is_closed():
    assert {s.value for s in MigrationStatus} <= set(schema_enum("MigrationStatus"))
    for table, enum_type in ((MIGRATION_TRANSITIONS, MigrationStatus), (FAILOVER_TRANSITIONS, FailoverStatus)):
        assert set(table) == set(enum_type)
        assert all(targets <= set(enum_type) for targets in table.values())


def test_a_transition_outside_the_table_is_a_bug():
    run = MigrationRun(lambda name, data: None)
    with pytest.raises(ValueError, match="no migration status transition none -> completed"):
        run.set_state("none", "completed")
    assert run.set_state("none", "setup") and run.status == "setup"
    assert not run.set_state("active", "completed")          # compare-and-set: not in 'active'
