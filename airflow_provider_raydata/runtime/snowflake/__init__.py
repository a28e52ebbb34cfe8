"""Snowflake, one module per job (all import the Snowflake connector, an optional extra):

- ``read`` (cluster): the query runs once, with bound parameters; its result batches (Arrow chunks
  that Snowflake serves from presigned URLs) are fetched in parallel by Ray read tasks and cast to
  the Arrow schema that Snowflake describes for the result;
- ``staging`` (cluster): Ray write tasks PUT the load's blocks as Parquet files on a named internal
  stage (``_raydata_stage`` in the target's schema, under a folder of this load); one ``COPY
  INTO`` loads them into a transient staging table (``PURGE = TRUE``);
- ``publish`` (Airflow worker, through ``hooks.snowflake``): one transaction checks and records
  the load in ``_raydata_loads`` and moves the staged rows into the target by mode (``INSERT``,
  ``INSERT OVERWRITE``, ``DELETE`` + ``INSERT``); an upsert is one ``MERGE`` (``runtime.upsert``).
  DDL commits implicitly in Snowflake, so tables are created before the transaction begins;
- ``common``: identifiers, table names, the ledger and staging tables' names.

Identifiers are always double-quoted (quotes doubled); values are always bound (``qmark``).
The connection parameters arrive inside the stage spec; nothing here logs or formats them.
"""
