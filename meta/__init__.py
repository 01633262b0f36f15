"""Replicated metadata for the masters: a sans-IO Raft core and its durable log.

``meta.raft`` decides (elections, replication, commit, snapshots, membership),
``meta.messages`` holds the values it exchanges with its driver and its peers,
and ``meta.log_store`` keeps the log on disk.  The master drives them; see
docs/RAFT.md.
"""
