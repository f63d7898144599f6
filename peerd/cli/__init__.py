"""The `peerd` command line: the parser, helpers shared by commands, one module per command, benches."""
