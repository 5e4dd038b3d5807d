"""The migration engine: stream format, RAM/device transfer, dirty tracking, codecs.

It sees a VM only through a small interface (RAM regions and a dirty log,
device state save/load, pause/resume), never through device internals.
"""
