#!/usr/bin/env python3
"""Opens N keepalive connections to 127.0.0.1:PORT, makes one GET on each (with HEADER), then
holds them all idle for HOLD seconds. Used by load.sh to measure memory per idle connection."""
import socket
import sys
import time

port, header, count, hold = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\n\r\n".encode()
conns, failed = [], 0
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    answer = s.recv(4096)
    if not answer.startswith(b"HTTP/1.1 200"):
        failed += 1
    conns.append(s)
if failed:
    print(f"idle_connections: {failed} of {count} first answers were not 200", file=sys.stderr)
time.sleep(hold)
for s in conns:
    s.close()
