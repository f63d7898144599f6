"""The peer daemon: its lifecycle (startup -> serve -> shutdown), block placement, capacity
measurement and its HTTP routes (health page, swarm API, /metrics, /healthz)."""
