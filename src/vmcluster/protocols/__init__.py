"""Sans-IO wire codecs: bytes in, values out (and back). No sockets, no clocks."""
