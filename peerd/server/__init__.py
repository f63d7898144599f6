"""Server side of a peer: RPC handlers, inference sessions, and the compute runtime."""
