"""Argument checking, table-driven, with QEMU's messages (checked against a real QEMU)."""
import asyncio

import pytest

from appliance.control.dispatch import CallContext
from appliance.control.migration_settings import DEFAULT_PARAMETERS
from appliance.control.node import Node
from appliance.qapi import QMPError


@pytest.fixture
async def node():
    return Node("args", asyncio.get_running_loop())


async def run(node, command, arguments=None):
    return await node.dispatcher.execute(command, arguments, CallContext())


async def error_of(node, command, arguments=None):
    with pytest.raises(QMPError) as info:
        await run(node, command, arguments)
    return info.value.error_class, info.value.desc


# (parameter, bad value, QEMU's message) for each migration parameter's bounds and types.
PARAMETER_ERRORS = [
    ("announce-initial", 100001, "Parameter 'announce_initial' expects a value between 0 and 100000"),
    ("announce-initial", "x", "Parameter 'announce-initial' expects uint64"),
    ("announce-max", 100001, "Parameter 'announce_max' expects a value between 0 and 100000"),
    ("announce-rounds", 1001, "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    ("announce-step", 0, "Parameter 'announce_step' expects a value between 0 and 10000"),
    ("announce-step", 10001, "Parameter 'announce_step' expects a value between 0 and 10000"),
    ("compress-level", 10, "Parameter 'compress_level' expects a value between 0 and 9"),
    ("compress-level", 256, "Parameter 'compress-level' expects uint8_t"),
    ("compress-level", -1, "Parameter 'compress-level' expects uint8_t"),
    ("compress-level", "x", "Parameter 'compress-level' expects uint64"),
    ("compress-level", 1.5, "Parameter 'compress-level' expects uint64"),
    ("compress-threads", 0, "Parameter 'compress_threads' expects a value between 1 and 255"),
    ("compress-wait-thread", 1, "Invalid parameter type for 'compress-wait-thread', expected: boolean"),
    ("decompress-threads", 0, "Parameter 'decompress_threads' expects a value between 1 and 255"),
    ("throttle-trigger-threshold", 0, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ("throttle-trigger-threshold", 101, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ("cpu-throttle-initial", 0, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ("cpu-throttle-initial", 100, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ("cpu-throttle-increment", 0, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ("cpu-throttle-increment", 100, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ("cpu-throttle-tailslow", "yes", "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
    ("tls-creds", 1, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ("tls-hostname", [], "Invalid parameter type for 'tls-hostname', expected: StrOrNull"),
    ("max-bandwidth", "x", "Parameter 'max-bandwidth' expects uint64"),
    ("max-bandwidth", 2**64, "Parameter 'max-bandwidth' expects uint64"),
    ("downtime-limit", 2000001, "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ("downtime-limit", "a", "Parameter 'downtime-limit' expects uint64"),
    ("x-checkpoint-delay", 2**32, "Parameter 'x-checkpoint-delay' expects uint32_t"),
    ("x-checkpoint-delay", -1, "Parameter 'x-checkpoint-delay' expects uint32_t"),
    ("block-incremental", None, "Invalid parameter type for 'block-incremental', expected: boolean"),
    ("block-incremental", True, "Parameter 'block-incremental' needs old-style block migration, "
                                "which this appliance does not support"),
    ("multifd-channels", 0, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ("multifd-channels", 256, "Parameter 'multifd-channels' expects uint8_t"),
    ("xbzrle-cache-size", 1000, "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ("xbzrle-cache-size", 2048, "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ("max-postcopy-bandwidth", {}, "Parameter 'max-postcopy-bandwidth' expects uint64"),
    ("max-postcopy-bandwidth", 1 << 20, "Parameter 'max-postcopy-bandwidth' applies to postcopy, "
                                        "which this appliance's migration engine does not support yet"),
    ("max-cpu-throttle", 10, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ("max-cpu-throttle", 100, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ("multifd-compression", "lz4", "Parameter 'multifd-compression' does not accept value 'lz4'"),
    ("multifd-compression", 1, "Invalid parameter type for 'multifd-compression', expected: string"),
    ("multifd-zlib-level", 10, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ("multifd-zstd-level", 21, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ("block-bitmap-mapping", [{"node-name": "a"}], "Parameter 'block-bitmap-mapping[0].alias' is missing"),
    ("block-bitmap-mapping", {}, "Invalid parameter type for 'block-bitmap-mapping', expected: array"),
]


@pytest.mark.parametrize("param, value, message", PARAMETER_ERRORS)
async def test_parameter_errors(node, param, value, message):
    assert await error_of(node, "migrate-set-parameters", {param: value}) == ("GenericError", message)
    assert await run(node, "query-migrate-parameters") == DEFAULT_PARAMETERS, "a refused change must change nothing"


# (parameter, edge values that are accepted)
PARAMETER_EDGES = [
    ("announce-initial", [0, 100000]), ("announce-rounds", [0, 1000]), ("announce-step", [1, 10000]),
    ("compress-level", [0, 9]), ("compress-threads", [1, 255]), ("decompress-threads", [1, 255]),
    ("throttle-trigger-threshold", [1, 100]), ("cpu-throttle-initial", [1, 99]),
    ("cpu-throttle-increment", [1, 99]), ("max-bandwidth", [0, 2**64 - 1]),
    ("downtime-limit", [0, 2000000]), ("x-checkpoint-delay", [0, 2**32 - 1]),
    ("multifd-channels", [1, 255]), ("multifd-zlib-level", [0, 9]), ("multifd-zstd-level", [0, 20]),
    ("xbzrle-cache-size", [4096, 2**40]), ("max-cpu-throttle", [20, 99]),
    ("multifd-compression", ["none", "zlib", "zstd"]), ("cpu-throttle-tailslow", [True, False]),
]


@pytest.mark.parametrize("param, values", PARAMETER_EDGES)
async def test_parameter_edges_are_accepted(node, param, values):
    for value in values:
        assert await run(node, "migrate-set-parameters", {param: value}) == {}
        assert (await run(node, "query-migrate-parameters"))[param] == value


async def test_negative_uint64_wraps_as_qemu_does(node):
    await run(node, "migrate-set-parameters", {"max-bandwidth": -1})
    assert (await run(node, "query-migrate-parameters"))["max-bandwidth"] == 2**64 - 1


async def test_strornull_null_resets_to_empty(node):
    await run(node, "migrate-set-parameters", {"tls-hostname": "peer"})
    assert (await run(node, "query-migrate-parameters"))["tls-hostname"] == "peer"
    await run(node, "migrate-set-parameters", {"tls-hostname": None})
    assert (await run(node, "query-migrate-parameters"))["tls-hostname"] == ""


async def test_undeclared_tls_creds_are_refused(node):
    _, desc = await error_of(node, "migrate-set-parameters", {"tls-creds": "tls0"})
    assert desc == "No TLS credentials with id 'tls0'"
    _, desc = await error_of(node, "migrate-set-parameters", {"tls-authz": "auth0"})
    assert desc == "No authz object with id 'auth0'"


async def test_several_parameters_apply_together_or_not_at_all(node):
    await error_of(node, "migrate-set-parameters", {"downtime-limit": 500, "compress-level": 12})
    assert (await run(node, "query-migrate-parameters"))["downtime-limit"] == 300
    await run(node, "migrate-set-parameters", {"cpu-throttle-initial": 50, "max-cpu-throttle": 60})
    params = await run(node, "query-migrate-parameters")
    assert (params["cpu-throttle-initial"], params["max-cpu-throttle"]) == (50, 60)


@pytest.mark.parametrize("command, arguments, message", [
    ("migrate", None, "Parameter 'uri' is missing"),
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "blk": "x"}, "Invalid parameter type for 'blk', expected: boolean"),
    ("migrate", {"uri": "tcp:x:1", "x": 1}, "Parameter 'x' is unexpected"),
    ("migrate", {"uri": "foo:bar"}, "Parameter 'uri' expects a valid migration protocol"),
    ("query-status", {"x": 1}, "Parameter 'x' is unexpected"),
    ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
    ("migrate-set-capabilities", {"capabilities": {}}, "Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-set-capabilities", {"capabilities": [1]}, "Invalid parameter type for 'capabilities[0]', expected: object"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle"}]}, "Parameter 'capabilities[0].state' is missing"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "foo", "state": True}]},
     "Parameter 'capability' does not accept value 'foo'"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True, "x": 1}]},
     "Parameter 'capabilities[0].x' is unexpected"),
    ("migrate-continue", {"state": "bogus"}, "Parameter 'state' does not accept value 'bogus'"),
    ("migrate_set_downtime", {"value": "1"}, "Invalid parameter type for 'value', expected: number"),
    ("migrate_set_downtime", {"value": -1}, "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds"),
    ("migrate_set_speed", {"value": 1.5}, "Invalid parameter type for 'value', expected: integer"),
    ("migrate_set_speed", {"value": 2**63}, "Invalid parameter type for 'value', expected: integer"),
    ("calc-dirty-rate", {"calc-time": 0}, "calc-time is out of range[1, 60]."),
    ("calc-dirty-rate", {"calc-time": "1"}, "Invalid parameter type for 'calc-time', expected: integer"),
    ("getfd", {}, "Parameter 'fdname' is missing"),
    ("client_migrate_info", {"protocol": "vnc", "hostname": "x"}, "Parameter 'protocol' expects 'spice'"),
])
async def test_argument_errors(node, command, arguments, message):
    assert await error_of(node, command, arguments) == ("GenericError", message)


async def test_unknown_command(node):
    assert await error_of(node, "nope") == ("CommandNotFound", "The command nope has not been found")


async def test_capabilities_in_schema_order_default_false(node):
    caps = await run(node, "query-migrate-capabilities")
    assert [c["capability"] for c in caps] == node.schema.types["MigrationCapability"].values
    assert not any(c["state"] for c in caps)


@pytest.mark.parametrize("changes, message", [
    ([("multifd", True), ("compress", True)], "Multifd is not compatible with compress"),
    ([("postcopy-ram", True)], "Capability 'postcopy-ram' is not supported"),
    ([("rdma-pin-all", True)], "Capability 'rdma-pin-all' is not supported"),
    ([("block", True)], "Capability 'block' is not supported"),
    ([("background-snapshot", True)], "Capability 'background-snapshot' is not supported"),
])
async def test_capability_checks(node, changes, message):
    _, desc = await error_of(node, "migrate-set-capabilities",
                             {"capabilities": [{"capability": c, "state": s} for c, s in changes]})
    assert desc.startswith(message)
    assert not any(c["state"] for c in await run(node, "query-migrate-capabilities"))


async def test_capabilities_set_and_cleared(node):
    wanted = ["xbzrle", "auto-converge", "events", "multifd", "pause-before-switchover",
              "validate-uuid", "return-path", "release-ram"]
    await run(node, "migrate-set-capabilities",
              {"capabilities": [{"capability": c, "state": True} for c in wanted]})
    state = {c["capability"]: c["state"] for c in await run(node, "query-migrate-capabilities")}
    assert {c for c, s in state.items() if s} == set(wanted)
    await run(node, "migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": False}]})
    await run(node, "migrate-set-capabilities", {"capabilities": [{"capability": "compress", "state": True}]})


async def test_deprecated_aliases(node):
    await run(node, "migrate_set_downtime", {"value": 0.5})
    await run(node, "migrate_set_speed", {"value": 1000})
    await run(node, "migrate-set-cache-size", {"value": 1 << 20})
    params = await run(node, "query-migrate-parameters")
    assert (params["downtime-limit"], params["max-bandwidth"], params["xbzrle-cache-size"]) == (500, 1000, 1 << 20)
    assert await run(node, "query-migrate-cache-size") == 1 << 20
    _, desc = await error_of(node, "migrate-set-cache-size", {"value": 1000})
    assert desc == "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"


async def test_idle_migration_and_colo_state(node):
    assert await run(node, "query-migrate") == {}
    assert await run(node, "query-colo-status") == {"mode": "none", "last-mode": "none", "reason": "none"}
    assert await run(node, "migrate_cancel") == {}
    assert await error_of(node, "migrate-continue", {"state": "pre-switchover"}) == \
        ("GenericError", "Migration not in expected state: none")
    assert await error_of(node, "x-colo-lost-heartbeat") == ("GenericError", "The feature 'colo' is not enabled")
    assert await error_of(node, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == \
        ("GenericError", "this node has no guest to migrate into (start it with --guest)")
