"""Code that imports no Airflow (the cluster may not have it; ``tests/unit/test_refs.py`` blocks it).

Most of it runs on the Ray cluster, inside a stage (``runner.run_stage``). Some of it runs on the
Airflow worker, called by ``hooks``: Snowflake publishing (``snowflake.publish``), BigQuery loads
(``bigquery.load``) and the sweep of orphaned PostgreSQL staging tables (``postgres.sweep``);
``specs``, ``types`` and ``tuning`` also validate at DAG parse time. Each module says where it runs.
"""
