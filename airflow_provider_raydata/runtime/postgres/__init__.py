"""PostgreSQL, one module per job (all import psycopg 3, an optional extra):

- ``read``: ``ray.data.read_sql`` sharded on a key, with bound parameters (cluster);
- ``staging``: checks a load against the target and COPYs the committed Parquet files, in
  parallel, into a staging table (cluster);
- ``publish``: moves the rows into the target in one transaction, by mode (cluster);
- ``upsert``: the upsert's SQL (``runtime.upsert``'s rules as ``INSERT ... ON CONFLICT``);
- ``load``: stage + publish in a transaction held open until the Airflow task commits it (cluster);
- ``sweep``: drops the staging tables of killed loads (Airflow worker, ``hooks.postgres``);
- ``common``: names, identifiers, types and the ledger shared by the others.

Identifiers are always quoted with ``psycopg.sql``; values are always bound. The connection
parameters arrive inside the stage spec; nothing here logs or formats them.
"""
