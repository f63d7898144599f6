"""Talking to a peer: stream names, tensor wire conversion, the ``PeerClient`` transport and the
client's error tree (with the one failover policy). Used by clients and by peers (RTT probes)."""
