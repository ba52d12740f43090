"""Sharded, resumable captioning over large collections (`clipcap caption --output-dir`)."""
