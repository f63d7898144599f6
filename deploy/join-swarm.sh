#!/bin/sh
# Entry point of the compose peers: join the swarm through the compose bootstrap node, then run
# `peerd "$@"`. A multiaddr needs the bootstrap's peer id, which exists only once its identity key
# was created, so the bootstrap publishes it in a ready file on the shared state volume.
#   join-swarm.sh run --blocks 0:10 ...   ->   peerd run --blocks 0:10 ... --initial-peers /dns4/bootstrap/tcp/31330/p2p/<id>
set -eu
ready="${PEERD_BOOTSTRAP_READY_FILE:-/var/lib/peerd/bootstrap.json}"
host="${PEERD_BOOTSTRAP_HOST:-bootstrap}"
port="${PEERD_BOOTSTRAP_PORT:-31330}"
wait_s="${PEERD_BOOTSTRAP_WAIT_S:-120}"

waited=0
until [ -s "$ready" ]; do
    if [ "$waited" -ge "$wait_s" ]; then
        echo "join-swarm: no $ready after ${wait_s}s; is the bootstrap service running?" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
peer_id=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["peer_id"])' "$ready")
# one --initial-peers value (comma-separated when several), so it can go anywhere on the line
exec peerd "$@" --initial-peers "/dns4/${host}/tcp/${port}/p2p/${peer_id}"
