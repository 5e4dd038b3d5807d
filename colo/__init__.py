"""COLO: checkpoint protocol, secondary colo cache, heartbeat and failover."""
