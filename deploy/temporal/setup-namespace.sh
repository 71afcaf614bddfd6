#!/bin/sh
# Registers Lookout's namespace and the search attributes of core/temporal.py (StreamId and
# StreamState, Keyword) so the Web UI can list streams by id and state. Safe to re-run.
set -eu

ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"
NAMESPACE="${TEMPORAL_NAMESPACE:-default}"
RETENTION="${TEMPORAL_RETENTION:-168h}"

until temporal operator cluster health --address "$ADDRESS" | grep -q SERVING; do
    echo "waiting for the temporal frontend at $ADDRESS"
    sleep 2
done

if ! temporal operator namespace describe --address "$ADDRESS" --namespace "$NAMESPACE" >/dev/null 2>&1; then
    temporal operator namespace create --address "$ADDRESS" --namespace "$NAMESPACE" --retention "$RETENTION"
fi

# A new namespace reaches the frontend's cache a few seconds after it is created.
until temporal operator search-attribute list --address "$ADDRESS" --namespace "$NAMESPACE" >/dev/null 2>&1; do
    echo "waiting for namespace $NAMESPACE"
    sleep 2
done

for name in StreamId StreamState; do
    if temporal operator search-attribute list --address "$ADDRESS" --namespace "$NAMESPACE" | grep -qw "$name"; then
        echo "search attribute $name already registered"
    else
        temporal operator search-attribute create --address "$ADDRESS" --namespace "$NAMESPACE" \
            --name "$name" --type Keyword
    fi
done
echo "namespace $NAMESPACE ready"
