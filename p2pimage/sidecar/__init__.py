"""The sidecar's torrent indexer, and a node's client for the sidecar (tokens, torrents, JWKS)."""
