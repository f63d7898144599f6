"""Everything the daemon and the client do with the hivemind DHT: record schema, validators, lookups."""
