"""Test machinery for xbt_dist: not part of the package, not in the wheel.

- `distributed`: tiny stage functions Ray workers import by module name (Ray cannot unpickle
  functions defined in a test module), a gloo process spawner, tiny XBT models and a local
  multi-node Ray cluster manager.
- `synthetic`: tiny webdataset shard sets (real `TarWriter` output, no downloads).

It sits at the repository root beside `xbt_dist`; tests/conftest.py puts the root on `sys.path`
and on the `PYTHONPATH` that Ray nodes, their workers and spawned processes inherit, so an
editable or a regular install of xbt_dist needs nothing more. Benchmarks run from the root
(`python -m bench.NAME`), where it is importable too.
"""
