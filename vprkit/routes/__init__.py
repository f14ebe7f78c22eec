"""Routes: tables whose rows have an order (frame index or time), split into drives.

`order.py` reads the order of a PlaceTable and checks it (`route_of` -> `Route`); `windows.py`
turns a route into causal windows of `seq_len` frames (`causal_windows`), the unit every
sequence method (matching, the learned sequence descriptor) works on.
"""
