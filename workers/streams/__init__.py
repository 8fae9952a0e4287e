"""Redis Streams: a source and its sink (output entries, exactly once)."""
