"""Benchmarks of speccluster-ssh against dask's own ``SSHCluster``.

Run ``python -m bench --help`` from the repository root. The bench builds an
SSH lab of network namespaces (``tests/sshlab.py``), runs both tools on the
same hosts in alternating order, and writes ``runs.json``, ``results.md`` and
``startup.png`` to the output directory.
"""
