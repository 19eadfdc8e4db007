"""Torrent metainfo and its bencoding (sans-I/O codecs)."""
