"""The measuring code behind `scripts/bench` (issue 10): what the addon costs.

- `__main__`: the run, the table and the JSON;
- `upstream`: the servers behind the proxies, in their own process;
- `clients`: minimal HTTP/1.1 and WebSocket clients (HTTP/2 is `scripts/wspeers/h2ws.py`'s);
- `procs`: mitmdump processes and what /proc says about them;
- `probe`: a mitmdump script that answers, on a loopback socket, how full the
  addon's structures are;
- `memory`: the addon's bytes per tracked handshake, with tracemalloc, in a
  process of its own.
"""
