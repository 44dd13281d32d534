"""A fault bed for real valuemesh daemons: network namespaces, nftables, tc, small mounts,
kill -9 under load, and a Jepsen-style checker of the recorded history (docs/reliability.md).
"""
