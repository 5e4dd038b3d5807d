"""Migration capabilities and parameters, with QEMU 6.0's defaults, checks and messages.

``migrate-set-capabilities`` and ``migrate-set-parameters`` change these;
``query-migrate-capabilities`` and ``query-migrate-parameters`` report them.
New values are checked on a copy and applied only when the whole request is
valid, as QEMU's ``migrate_params_test_apply`` / ``migrate_params_check`` do.

Every capability and parameter accepted here acts (docs/migration.md says
where); what the engine cannot do is refused with a reason, never accepted and
ignored: UNSUPPORTED_CAPABILITIES, and block-incremental, max-postcopy-bandwidth
and block-bitmap-mapping away from their defaults.
"""
from __future__ import annotations

import copy

from appliance.qapi import QMPError, Schema
from replication.tls import TlsError, TlsRegistry

TARGET_PAGE_SIZE = 4096
MAX_MIGRATE_DOWNTIME_SECONDS = 2000

# Capabilities the engine cannot honour; refused instead of silently accepted.
UNSUPPORTED_CAPABILITIES = {
    "rdma-pin-all": "RDMA is not supported by this appliance",
    "block": "old-style block migration is not supported; the guest disk is replicated by COLO block replication",
    "postcopy-ram": "postcopy is not supported yet by this appliance's migration engine",
    "postcopy-blocktime": "postcopy is not supported yet by this appliance's migration engine",
    "dirty-bitmaps": "block dirty bitmaps are not supported by this appliance",
    "late-block-activate": "late block activation is not supported by this appliance",
    "x-ignore-shared": "ignore-shared is not supported by this appliance",
    "background-snapshot": "background snapshots are not supported by this appliance",
    "zero-blocks": "old-style block migration is not supported by this appliance",
}

# QEMU 6.0's defaults (migration/migration.c, migration_properties).
DEFAULT_PARAMETERS = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "compress-level": 1,
    "compress-threads": 8,
    "compress-wait-thread": True,
    "decompress-threads": 2,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": 134217728,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "block-incremental": False,
    "multifd-channels": 2,
    "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
}


def _expects(param: str, what: str) -> QMPError:
    return QMPError(f"Parameter '{param}' expects {what}")


def check_parameters(p: dict) -> None:
    """QEMU's migrate_params_check, on the merged parameters."""
    if p["compress-level"] > 9:
        raise _expects("compress_level", "a value between 0 and 9")
    if p["compress-threads"] < 1:
        raise _expects("compress_threads", "a value between 1 and 255")
    if p["decompress-threads"] < 1:
        raise _expects("decompress_threads", "a value between 1 and 255")
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if p["downtime-limit"] > MAX_MIGRATE_DOWNTIME_SECONDS * 1000:
        raise _expects("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if p["multifd-channels"] < 1:
        raise _expects("multifd_channels", "a value between 1 and 255")
    if p["multifd-zlib-level"] > 9:
        raise _expects("multifd_zlib_level", "a value between 0 and 9")
    if p["multifd-zstd-level"] > 20:
        raise _expects("multifd_zstd_level", "a value between 0 and 20")
    size = p["xbzrle-cache-size"]
    if size < TARGET_PAGE_SIZE or size & (size - 1):
        raise _expects("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if p["announce-initial"] > 100000:
        raise _expects("announce_initial", "a value between 0 and 100000")
    if p["announce-max"] > 100000:
        raise _expects("announce_max", "a value between 0 and 100000")
    if p["announce-rounds"] > 1000:
        raise _expects("announce_rounds", "a value between 0 and 1000")
    if not 1 <= p["announce-step"] <= 10000:
        raise _expects("announce_step", "a value between 0 and 10000")
    if p["block-incremental"]:
        raise QMPError("Parameter 'block-incremental' needs old-style block migration, "
                       "which this appliance does not support")
    if p["max-postcopy-bandwidth"]:
        raise QMPError("Parameter 'max-postcopy-bandwidth' applies to postcopy, "
                       "which this appliance's migration engine does not support yet")
    if p.get("block-bitmap-mapping"):
        raise QMPError("Invalid mapping given for block-bitmap-mapping: "
                       "block dirty bitmaps are not supported by this appliance")


def check_capabilities(caps: dict[str, bool]) -> None:
    """QEMU's migrate_caps_check, plus refusal of what the engine cannot do."""
    for name, enabled in caps.items():
        if enabled and name in UNSUPPORTED_CAPABILITIES:
            raise QMPError(f"Capability '{name}' is not supported: {UNSUPPORTED_CAPABILITIES[name]}")
    if caps["postcopy-ram"] and caps["x-ignore-shared"]:
        raise QMPError("Postcopy is not compatible with ignore-shared")
    if caps["multifd"] and caps["compress"]:
        raise QMPError("Multifd is not compatible with compress")


class MigrationSettings:
    """The capabilities and parameters the next migration will use."""

    def __init__(self, schema: Schema, tls: TlsRegistry | None = None):
        """``tls``: the node's tls-creds and authz objects, which tls-creds and tls-authz name."""
        self.tls = tls or TlsRegistry()
        self._cap_names = schema.types["MigrationCapability"].values
        self.capabilities = {name: False for name in self._cap_names}
        self.parameters = copy.deepcopy(DEFAULT_PARAMETERS)

    def query_capabilities(self) -> list[dict]:
        return [{"capability": n, "state": self.capabilities[n]} for n in self._cap_names]

    def set_capabilities(self, changes: list[dict], migration_running: bool) -> None:
        if migration_running:
            raise QMPError("There's a migration process in progress")
        new = dict(self.capabilities)
        for change in changes:
            new[change["capability"]] = change["state"]
        check_capabilities(new)
        self.capabilities.update(new)    # in place: a waiting incoming migration reads them live

    def query_parameters(self) -> dict:
        return copy.deepcopy(self.parameters)

    def set_parameters(self, changes: dict) -> None:
        new = copy.deepcopy(self.parameters)
        for key, value in changes.items():
            # StrOrNull: null means "unset", reported as "" as QEMU does.
            new[key] = "" if value is None else value
        check_parameters(new)
        try:
            self.tls.check_parameters(new)
        except TlsError as e:
            raise QMPError(str(e)) from None
        self.parameters.update(new)      # in place: a running migration reads them live
